"""bench/data.py at a tiny size: the harness runs end to end, its result has the shape the table reads, and the
S3 stand-in it started is gone afterwards. No timing is asserted; the figures come from ``python -m bench``."""

from __future__ import annotations

from bench import data, table


def test_data_bench_measures_both_layouts_and_leaves_nothing_listening():
    result = data.run(photos=200, pipeline_photos=60, rounds=1)

    staging = result["staging"]
    assert staging["per_object"]["objects"] == 400  # each photo's jpg and json are separate objects
    assert staging["shards"]["objects"] == 1  # 200 photos fit one ~1,000-photo shard
    assert staging["per_object"]["seconds"] > 0 and staging["shards"]["seconds"] > 0
    assert staging["goal_met"] == (staging["speedup"] >= 5)
    cases = {c["case"]: c for c in result["pipeline"]["cases"]}
    assert set(cases) == {"disk/objects", "disk/shards", "s3/objects", "s3/shards", "memory (decode only)"}
    assert all(c["photos"] == 60 and c["photos_per_s"] > 0 for c in cases.values())
    full = result["extrapolation"]
    assert full["photos"] == 360_767 and full["hosts"] == 3
    assert full["shards_sharded_by_s3_key"]["shards_per_host"] == 121  # ceil(ceil(360,767 / 1,000) / 3)
    assert full["per_object_fully_replicated"]["objects_per_host"] == 2 * 360_767
    assert "no published average" in full["assumption"]
    assert result["recommendation"]["shard_channels"] in ("File", "FastFile")
    assert result["listening_after"] is False and not data.is_listening(result["port"])
    text = table.render({"data": result}, {"date": "now", "cpus": 2}, {"threads": 1, "seconds": 1.0})
    assert "Shards stage" in text and "InputMode for shard channels" in text


def test_extrapolation_replicates_per_object_channels_and_splits_shards_across_hosts():
    measured_objects = {"objects": 2_000, "bytes": 9_000_000, "seconds": 10.0}
    measured_shards = {"objects": 1, "bytes": 100_000_000, "seconds": 1.0}  # 100 MB/s
    one = data.extrapolate(measured_objects, measured_shards, photos=30_000, hosts=1, original_bytes=30_000,
                           metadata_bytes=2_000)
    three = data.extrapolate(measured_objects, measured_shards, photos=30_000, hosts=3, original_bytes=30_000,
                             metadata_bytes=2_000)
    # 5 ms per object less 4,500 B at 100 MB/s = 4.955 ms fixed per object.
    assert one["measured_fixed_ms_per_object"] == 4.955
    # Every host stages every object of a FullyReplicated channel, so more hosts change nothing per host.
    assert three["per_object_fully_replicated"]["minutes_per_host"] == one["per_object_fully_replicated"][
        "minutes_per_host"]
    assert three["shards_sharded_by_s3_key"]["shards_per_host"] == 10
    assert three["shards_sharded_by_s3_key"]["minutes_per_host"] < one["shards_sharded_by_s3_key"]["minutes_per_host"]


def test_recommendation_follows_the_streamed_share_of_the_disk_rate():
    slow = {"disk/shards": 1_000.0, "s3/shards": 500.0, "disk/objects": 1_000.0, "s3/objects": 50.0}
    fast = slow | {"s3/shards": 950.0}
    assert data.recommend(slow, 1.0, 3)["shard_channels"] == "File"
    assert data.recommend(fast, 1.0, 3)["shard_channels"] == "FastFile"
