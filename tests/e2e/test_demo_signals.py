"""Nothing is left running whatever stops the demo (issue 24, item 2): the demo is stopped at each stage, with a
real signal sent to the real process, and afterwards no process it started (directly or not: they carry its
run's marker in their environment) and no port it announced is left.

- synth, SIGTERM: the synth child (Python and the CDK's Node) is running.
- deploy, SIGINT: a few seconds into the shipped model's "Release model", while ml.serve is starting up.
- training, SIGKILL: the demo gets no chance to clean up; the trainer and the endpoint server notice their
  parent is gone (invmon/lifeline.py) and stop their process groups.
- counting, SIGTERM: the endpoint is serving the count Lambda.

Cost: four demo runs on the trimmed sample, each cut short at its stage (about 15, 40, 60 and 110 s on two idle
cores; the counting one is the longest as it runs the whole pipeline first).
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from invmon.lifeline import GRACE_SECONDS
from lambdas.training.request import ENTRY_POINT
from tests.e2e.test_demo import ROOT, _demo, _environment, _left_behind, _listening, trimmed_sample  # noqa: F401

STAGES = {
    # stage: (a line that shows the stage has begun, seconds to wait after it, the signal, exit status or None)
    "synth": ("[1/", 3.0, signal.SIGTERM, 128 + signal.SIGTERM),
    "deploy": ("Release model", 2.0, signal.SIGINT, 130),
    "training": (f"python {ENTRY_POINT}", 3.0, signal.SIGKILL, -signal.SIGKILL),
    "counting": ("held-back photos", 1.0, signal.SIGTERM, 128 + signal.SIGTERM),
}


def _gone(marker: str, output: str, within: float) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + within
    while True:
        left, listening = _left_behind(marker), _listening(output)
        if (not left and not listening) or time.monotonic() > deadline:
            return left, listening
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_stopping_the_demo_at_any_stage_leaves_no_process_or_port(tmp_path: Path, trimmed_sample: Path,  # noqa: F811
                                                                  stage: str) -> None:
    marker_line, delay, signum, status = STAGES[stage]
    workdir, marker = tmp_path / "run", uuid.uuid4().hex
    process = subprocess.Popen(_demo(workdir, trimmed_sample), cwd=ROOT, env=_environment(tmp_path, marker),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    seen: list[str] = []
    try:
        for line in process.stdout:
            seen.append(line)
            if marker_line in line:
                break
        else:
            pytest.fail(f"the demo ended before the {stage} stage:\n{''.join(seen)[-3000:]}")
        time.sleep(delay)
        assert _left_behind(marker), f"the demo should have children at the {stage} stage"
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest
    assert process.returncode == status, output[-3000:]
    if signum != signal.SIGKILL:
        assert "Traceback" not in rest, rest[-3000:]
        assert rest.strip().splitlines()[-1].startswith("invmon: "), rest[-3000:]
    # After SIGKILL the children stop themselves: SIGTERM at once, SIGKILL after the grace period.
    left, listening = _gone(marker, output, within=GRACE_SECONDS + 10)
    assert left == [] and listening == [], (left, listening, output[-3000:])
