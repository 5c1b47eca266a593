"""Training data as one object per photo against ~1,000-photo tar shards: staging time and input-pipeline rate.

``python -m bench --only data`` (or ``run()``) starts moto's ``ThreadedMotoServer`` on 127.0.0.1 as the S3
stand-in, puts the same photos there both ways (``raw/bin-images/<id>.jpg`` + ``raw/metadata/<id>.json``, and
``shards/bench/train/train-NNNNNN.tar`` written with :func:`ml.shards.pack`), and measures from a fresh
client process (so the stand-in and the client do not share one interpreter lock):

- **staging**: the time to bring every object of the channel to local disk, as SageMaker File mode does
  before the first step. ``STAGE_THREADS`` (10) GETs in flight: the default of both boto3's
  ``TransferConfig.max_concurrency`` and the AWS CLI's ``max_concurrent_requests`` ("The default value is
  10", https://docs.aws.amazon.com/cli/latest/topic/s3-config.html), and botocore's default connection pool
  (``max_pool_connections`` 10). SageMaker does not publish the concurrency of its own File-mode
  downloader, so the client everyone gets by default stands in for it. One GET per object (no HeadObject
  first): the cheapest a per-object download can be, which favours the per-object channel;
- **input pipeline**: photos per second of one loader worker (one process, one thread, as one DataLoader
  worker) reading a photo and its metadata and decoding it to the training size with ``ml.data.decode``,
  from disk and streamed straight from the stand-in (FastFile-like: every photo file is its own GET; a
  shard is one GET read as a stream by :func:`ml.shards.read_shard`).

Then it extrapolates to the full counting split on several hosts with the measured per-object and per-byte
rates, and says which InputMode the figures favour for shard channels. The stand-in is one Python process
on this machine, not S3: its per-request cost is CPU, S3's is network latency (tens of ms). The ratio holds
the direction; the absolute seconds are the stand-in's.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import common
from invmon.local import patched_environ

SHARED_ABID = Path("/work/shared/abid")
BUCKET_PREFIX = "bench-data"
SHARD_PHOTOS = 1_000  # the pack step's target (issue #19): ~1,000 photos per shard
STAGE_THREADS = 10  # boto3 TransferConfig.max_concurrency / AWS CLI max_concurrent_requests default (see above)
IMAGE_SIZE = 224  # ml.train --image-size default
FULL_PHOTOS = 360_767  # ABID counting challenge train 324,735 + validation 36,032 (lambdas/ingest/lists)
FULL_HOSTS = 3
# No published average size of the ABID originals was found (the bucket's listing would give it; no network
# here). Assumption: same JPEG bytes per pixel as the 224 px sample, at the middle of the 300-600 px a side
# that /work/shared/abid/README.md states (450 x 450): 8,000 B x (450/224)^2 = ~32,300 B. A parameter: pass
# original_bytes to run() to redo the extrapolation with a measured figure.
ASSUMED_ORIGINAL_SIDE_PX = 450
TAR_HEADER_BYTES_PER_PHOTO = 2 * 512 + 512  # two ustar headers, and on average half a 512 B block of padding
PIPELINE_ROUNDS = 3
FASTFILE_KEEPS = 0.8  # streaming must keep this share of the from-disk rate to be worth skipping the staging


def source_photos(count: int) -> tuple[list[tuple[str, bytes, bytes]], str]:
    """``count`` (key, jpg, metadata json) triples and where they came from: the shared ABID copy when present,
    else the shipped sample repeated under distinct keys (same bytes)."""
    folder, provenance = (SHARED_ABID, "the shared ABID copy /work/shared/abid (224 px photos)") \
        if (SHARED_ABID / "metadata").is_dir() else (common.SAMPLE_DIR, "the shipped sample data/abid-sample")
    files = common.photo_files(folder)
    if not files:
        raise SystemExit(f"no photos under {folder}/bin-images")
    photos = []
    for index in range(count):
        path = files[index % len(files)]
        repeat = index // len(files)
        key = path.stem if repeat == 0 else f"{path.stem}-{repeat}"
        photos.append((key, path.read_bytes(), (folder / "metadata" / f"{path.stem}.json").read_bytes()))
    if count > len(files):
        provenance += f", {len(files)} distinct photos repeated to {count}"
    return photos, provenance


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _client():
    import boto3
    from botocore.config import Config

    # The pool as large as the threads using it, as boto3's transfer manager sizes it.
    return boto3.client("s3", region_name="us-east-1",
                        config=Config(max_pool_connections=STAGE_THREADS, retries={"mode": "standard"}))


def _seed(s3, bucket: str, photos: list[tuple[str, bytes, bytes]]) -> dict[str, Any]:
    from ml import shards

    s3.create_bucket(Bucket=bucket)
    objects = [(f"raw/bin-images/{key}.jpg", jpg) for key, jpg, _ in photos]
    objects += [(f"raw/metadata/{key}.json", meta) for key, _, meta in photos]
    shard_keys = []
    for index, start in enumerate(range(0, len(photos), SHARD_PHOTOS)):
        body = shards.pack(shards.Sample(k, j, m) for k, j, m in photos[start : start + SHARD_PHOTOS])
        key = f"shards/bench/train/{shards.shard_name('train', index)}"
        objects.append((key, body))
        shard_keys.append(key)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]), objects))
    return {"shard_keys": shard_keys, "shard_bytes": sum(len(b) for k, b in objects if k.startswith("shards/"))}


# --- client side: runs in a fresh process (bench.child) ------------------------------------------------------


def stage(bucket: str, keys: list[str], threads: int = STAGE_THREADS) -> dict[str, Any]:
    """Download ``keys`` to a temporary folder with ``threads`` GETs in flight; seconds and bytes."""
    s3 = _client()
    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        root = Path(tmp)

        def fetch(key: str) -> int:
            target = root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            data = body.read()
            target.write_bytes(data)
            return len(data)

        fetch(keys[0])  # connection set up and client warm before the clock runs; not counted
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(fetch, keys))
        seconds = time.perf_counter() - started
    return {"objects": len(keys), "bytes": sum(sizes), "seconds": round(seconds, 3), "threads": threads}


def _decode(key: str, jpg: bytes, meta: bytes) -> None:
    from ml import abid
    from ml.data import decode

    abid.parse_metadata(key, meta)
    decode(jpg, IMAGE_SIZE)


def pipeline(case: str, bucket: str, keys: list[str], photos: int) -> dict[str, Any]:
    """One loader worker: read ``photos`` photos (the keys are photo ids for per-object cases, shard keys for
    shard cases) and decode them to the training size; photos per second."""
    from ml import shards

    s3 = _client()
    source, layout = case.split("/")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        if source == "disk":  # staged first, as File mode leaves it; not timed
            objects = [f"raw/bin-images/{k}.jpg" for k in keys] + [f"raw/metadata/{k}.json" for k in keys] \
                if layout == "objects" else keys
            for key in objects:
                (root / key).parent.mkdir(parents=True, exist_ok=True)
                (root / key).write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        _decode(*_first_photo(s3, bucket, keys, layout))  # imports and PIL warm-up outside the clock
        done = 0
        started = time.perf_counter()
        if layout == "objects":
            for key in keys[:photos]:
                if source == "disk":
                    jpg = (root / f"raw/bin-images/{key}.jpg").read_bytes()
                    meta = (root / f"raw/metadata/{key}.json").read_bytes()
                else:
                    meta = s3.get_object(Bucket=bucket, Key=f"raw/metadata/{key}.json")["Body"].read()
                    jpg = s3.get_object(Bucket=bucket, Key=f"raw/bin-images/{key}.jpg")["Body"].read()
                _decode(key, jpg, meta)
                done += 1
        else:
            def decode_shard(handle: Any) -> bool:
                """Decode a shard's photos until ``photos`` are done; True when they are."""
                nonlocal done
                for sample in shards.read_shard(handle):
                    _decode(sample.key, sample.image, sample.metadata)
                    done += 1
                    if done >= photos:
                        return True
                return False

            for key in keys:
                if source == "disk":
                    with open(root / key, "rb") as handle:
                        enough = decode_shard(handle)
                else:
                    with s3.get_object(Bucket=bucket, Key=key)["Body"] as handle:
                        enough = decode_shard(handle)
                if enough:
                    break
        seconds = time.perf_counter() - started
    return {"case": case, "photos": done, "seconds": round(seconds, 3), "photos_per_s": round(done / seconds, 1)}


def decode_only(photos: int) -> dict[str, Any]:
    """The ceiling of any pipeline: decoding photos already in memory."""
    items, _ = source_photos(photos)
    _decode(*items[0])
    started = time.perf_counter()
    for item in items:
        _decode(*item)
    seconds = time.perf_counter() - started
    return {"case": "memory (decode only)", "photos": len(items), "seconds": round(seconds, 3),
            "photos_per_s": round(len(items) / seconds, 1)}


def _first_photo(s3, bucket: str, keys: list[str], layout: str) -> tuple[str, bytes, bytes]:
    from ml import shards

    if layout == "objects":
        return (keys[0], s3.get_object(Bucket=bucket, Key=f"raw/bin-images/{keys[0]}.jpg")["Body"].read(),
                s3.get_object(Bucket=bucket, Key=f"raw/metadata/{keys[0]}.json")["Body"].read())
    sample = next(shards.read_shard(s3.get_object(Bucket=bucket, Key=keys[0])["Body"]))
    return sample.key, sample.image or b"", sample.metadata or b""


# --- the arithmetic ----------------------------------------------------------------------------------------


def extrapolate(objects: dict[str, Any], sharded: dict[str, Any], *, photos: int, hosts: int,
                original_bytes: float, metadata_bytes: float) -> dict[str, Any]:
    """Staging time per host for ``photos`` photos on ``hosts`` hosts, from the measured rates.

    Model: a staged object costs a fixed time (request, per-object work) plus its bytes at the channel's byte
    rate. The byte rate comes from the shard staging (large objects: nearly all bytes); the fixed time per
    object is what is left of the per-object staging once its bytes are paid at that rate.
    """
    byte_rate = sharded["bytes"] / sharded["seconds"]  # bytes/s with STAGE_THREADS in flight
    per_object_s = objects["seconds"] / objects["objects"]
    fixed_s = max(0.0, per_object_s - (objects["bytes"] / objects["objects"]) / byte_rate)
    photo_bytes = original_bytes + metadata_bytes
    shard_count = math.ceil(photos / SHARD_PHOTOS)
    shards_per_host = math.ceil(shard_count / hosts)
    # FullyReplicated per-object channel: every host fetches every object.
    replicated_s = 2 * photos * fixed_s + photos * photo_bytes / byte_rate
    # ShardedByS3Key: each host fetches a third of the shards.
    sharded_s = shards_per_host * fixed_s + (shards_per_host * SHARD_PHOTOS) * (
        photo_bytes + TAR_HEADER_BYTES_PER_PHOTO) / byte_rate
    return {
        "photos": photos,
        "hosts": hosts,
        "measured_byte_rate_mb_per_s": round(byte_rate / 1e6, 1),
        "measured_fixed_ms_per_object": round(fixed_s * 1000, 3),
        "assumed_original_bytes": round(original_bytes),
        "metadata_bytes": round(metadata_bytes),
        "per_object_fully_replicated": {
            "objects_per_host": 2 * photos,
            "gb_per_host": round(photos * photo_bytes / 1e9, 2),
            "gb_all_hosts": round(hosts * photos * photo_bytes / 1e9, 2),
            "minutes_per_host": round(replicated_s / 60, 1),
        },
        "shards_sharded_by_s3_key": {
            "shards": shard_count,
            "shards_per_host": shards_per_host,
            "gb_per_host": round(shards_per_host * SHARD_PHOTOS * (photo_bytes + TAR_HEADER_BYTES_PER_PHOTO) / 1e9, 2),
            "minutes_per_host": round(sharded_s / 60, 1),
        },
        "ratio": round(replicated_s / sharded_s, 1),
    }


def recommend(rates: dict[str, float], staging_minutes: float, hosts: int,
              rounds: int = PIPELINE_ROUNDS) -> dict[str, Any]:
    """File or FastFile for shard channels, from the measured rates."""
    disk, streamed = rates["disk/shards"], rates["s3/shards"]
    keeps = streamed / disk
    per_object_streamed = rates["s3/objects"] / rates["disk/objects"]
    if keeps >= FASTFILE_KEEPS:
        mode = "FastFile"
        why = (f"one loader worker streaming shards from the stand-in reads {streamed:,.0f} photos/s against "
               f"{disk:,.0f} from local disk ({keeps:.0%}; median of {rounds} runs in turns, at or above the "
               f"{FASTFILE_KEEPS:.0%} threshold): a shard is one sequential GET and decoding dominates, so streaming "
               f"costs little, while File mode would stage ~{staging_minutes:.1f} min per host before the first step "
               "and again after every spot interruption. Per-object channels are the opposite case: streamed "
               f"they keep {per_object_streamed:.0%} of their disk rate (two GETs per photo), so they stay File")
    else:
        mode = "File"
        why = (f"one loader worker streaming shards from the stand-in keeps only {keeps:.0%} of its from-disk rate "
               f"({streamed:,.0f} against {disk:,.0f} photos/s; the threshold is {FASTFILE_KEEPS:.0%}), so FastFile "
               f"would need about {1 / keeps:.1f}x the loader workers to feed the same GPU, while staging a host's "
               f"shards takes ~{staging_minutes:.1f} min at the measured rates (repeated after a spot interruption): "
               "stage shards (File) and read them from local disk. Per-object channels stream even worse "
               f"({per_object_streamed:.0%} of their disk rate, two GETs per photo)")
    return {"shard_channels": mode, "why": why, "streamed_share_of_disk_rate": round(keeps, 3),
            "threshold": FASTFILE_KEEPS, "hosts": hosts}


def run(ctx: Any = None, *, photos: int | None = None, pipeline_photos: int | None = None,
        original_bytes: float | None = None, rounds: int = PIPELINE_ROUNDS) -> dict[str, Any]:
    """Measure; return the result (the runner writes bench/results/data.json)."""
    quick = bool(getattr(ctx, "quick", False))
    photos = photos or (200 if quick else 10_000)
    pipeline_photos = min(photos, pipeline_photos or (200 if quick else 2_000))
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    items, provenance = source_photos(photos)
    jpg_mean = statistics.fmean(len(j) for _, j, _ in items)
    meta_mean = statistics.fmean(len(m) for _, _, m in items)
    original = original_bytes or jpg_mean * (ASSUMED_ORIGINAL_SIDE_PX / IMAGE_SIZE) ** 2
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        with patched_environ(env):
            bucket = f"{BUCKET_PREFIX}-{uuid.uuid4().hex[:8]}"
            began = time.perf_counter()
            seeded = _seed(_client(), bucket, items)
            seed_seconds = time.perf_counter() - began
            keys = [k for k, _, _ in items]
            object_keys = [f"raw/bin-images/{k}.jpg" for k in keys] + [f"raw/metadata/{k}.json" for k in keys]

            def child(function: str, **kwargs: Any) -> dict[str, Any]:
                return common.run_child(f"bench.data:{function}", kwargs, threads=1, env=env, timeout=1800)

            # Shards first, between and after: three runs of a few seconds, the median taken.
            shard_runs = [child("stage", bucket=bucket, keys=seeded["shard_keys"])]
            object_run = child("stage", bucket=bucket, keys=object_keys)
            shard_runs += [child("stage", bucket=bucket, keys=seeded["shard_keys"]) for _ in range(2)]
            sharded = sorted(shard_runs, key=lambda r: r["seconds"])[len(shard_runs) // 2]
            pipeline_shards = seeded["shard_keys"][: math.ceil(pipeline_photos / SHARD_PHOTOS)]
            # The cases that decide the InputMode run in turns, PIPELINE_ROUNDS times each, and the median is kept:
            # a slow spell of this shared machine then hits every case alike. The slow per-object stream runs once.
            runs: dict[str, list[dict[str, Any]]] = {}
            for round_ in range(rounds):
                for case in ("disk/objects", "disk/shards", "s3/shards", "s3/objects", "memory (decode only)"):
                    if case == "s3/objects" and round_:
                        continue
                    if case.startswith("memory"):
                        measured = child("decode_only", photos=pipeline_photos)
                    else:
                        run_keys = keys[:pipeline_photos] if case.endswith("objects") else pipeline_shards
                        measured = child("pipeline", case=case, bucket=bucket, keys=run_keys, photos=pipeline_photos)
                    runs.setdefault(case, []).append(measured)
            cases = [_median_run(case_runs) for case_runs in runs.values()]
    finally:
        server.stop()
    staging = {
        "photos": photos,
        "threads": STAGE_THREADS,
        "per_object": _staging_row(object_run, photos),
        "shards": _staging_row(sharded, photos) | {"runs_seconds": [r["seconds"] for r in shard_runs]},
    }
    staging["speedup"] = round(object_run["seconds"] / sharded["seconds"], 1)
    staging["goal"] = 5
    staging["goal_met"] = staging["speedup"] >= 5
    rates = {c["case"]: c["photos_per_s"] for c in cases}
    full = extrapolate(object_run, sharded, photos=FULL_PHOTOS, hosts=FULL_HOSTS, original_bytes=original,
                       metadata_bytes=meta_mean)
    return {
        "benchmark": "training data: one object per photo against tar shards",
        "stand_in": f"moto {_moto_version()} ThreadedMotoServer on 127.0.0.1 (one Python process on this machine); "
                    "the client in a separate process",
        "photos_from": provenance,
        "photo_bytes_mean": round(jpg_mean),
        "metadata_bytes_mean": round(meta_mean),
        "shard_photos": SHARD_PHOTOS,
        "shards": len(seeded["shard_keys"]),
        "shard_bytes_mean": round(seeded["shard_bytes"] / len(seeded["shard_keys"])),
        "seed_seconds": round(seed_seconds, 1),
        "concurrency_note": f"{STAGE_THREADS} GETs in flight: boto3 TransferConfig.max_concurrency and AWS CLI "
                            "max_concurrent_requests default; SageMaker does not publish its File-mode downloader's",
        "staging": staging,
        "pipeline": {"image_size": IMAGE_SIZE, "worker": "one process, one thread (one DataLoader worker)",
                     "cases": cases},
        "extrapolation": full | {"assumption": (
            f"original photo bytes {round(original):,} = the sample's mean {round(jpg_mean):,} B x "
            f"({ASSUMED_ORIGINAL_SIDE_PX}/{IMAGE_SIZE})^2 (same bytes per pixel, {ASSUMED_ORIGINAL_SIDE_PX} px a "
            "side, the middle of the 300-600 px the ABID README states); no published average was found"
            if not original_bytes else f"original photo bytes {round(original):,}, given")},
        "recommendation": recommend(rates, full["shards_sharded_by_s3_key"]["minutes_per_host"], FULL_HOSTS, rounds),
        "port": port,
        "listening_after": is_listening(port),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["photos_per_s"])
    return ordered[len(ordered) // 2] | {"runs_photos_per_s": [r["photos_per_s"] for r in runs]}


def _staging_row(measured: dict[str, Any], photos: int) -> dict[str, Any]:
    return {"objects": measured["objects"], "bytes": measured["bytes"], "seconds": measured["seconds"],
            "photos_per_s": round(photos / measured["seconds"], 1),
            "objects_per_s": round(measured["objects"] / measured["seconds"], 1),
            "mb_per_s": round(measured["bytes"] / measured["seconds"] / 1e6, 2)}


def _moto_version() -> str:
    import moto

    return moto.__version__


def main(argv: list[str]) -> int:
    class _Ctx:
        quick = "--quick" in argv

    result = run(_Ctx())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
