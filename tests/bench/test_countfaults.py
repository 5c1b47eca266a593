"""bench/countfaults.py at a tiny size: the harness runs, and stalled endpoint calls lose no photo."""

from __future__ import annotations

from bench import countfaults


def test_count_lambda_loses_no_photo_when_endpoint_calls_stall():
    result = countfaults.run(records=12, stall_share=0.3, seed=3)
    assert result["stalled_calls"] > 0  # the faults really happened
    assert result["endpoint_calls"] > result["records"]  # stalled calls were retried
    assert (result["lost"], result["stored_records"]) == (0, 12)
    assert result["invocations_past_timeout"] == 0
