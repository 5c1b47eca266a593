"""Copy-worker throughput against a local S3 stand-in: one worker versus concurrent workers.

``python -m bench.ingest`` (or ``run()`` from the collector) starts moto's ``ThreadedMotoServer`` on
127.0.0.1 in this process, seeds a fake ``aft-vbi-pds`` with the shipped sample (photos and metadata), and
times ``lambdas.ingest.worker.process_batch`` (the code the Lambda runs) copying the same images into a fresh
KMS-encrypted data bucket per variant. Workers run in their own processes, as Lambda invocations do, so the
stand-in and the workers do not share one interpreter lock:

- ``1 worker x 1 thread``: the per-request latency bound, the seed's one-by-one pattern but server-side;
- ``1 worker x 16 threads``: one deployed worker (INGEST_WORKER_THREADS = 16);
- ``K workers x 1 thread`` and ``K workers x 16 threads``: batches in parallel, as the Distributed Map runs them;
- a rerun of the 16-thread worker over the copied data: the idempotent path (HeadObject only, no copy).

Each worker also reports its own CPU seconds per image: the client-side cost that bounds a Lambda worker
(512 MB is about 0.29 vCPU) whatever S3 answers. The figures are of the stand-in, not of S3; the note in the
results scales them to AWS with the assumptions written next to each number.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "data" / "abid-sample"
RESULTS = ROOT / "bench" / "results" / "ingest.json"
SOURCE = "aft-vbi-pds"
DEPLOYED_THREADS = 16
LAMBDA_512MB_VCPU = 512 / 1769  # Lambda gives one full vCPU at 1,769 MB, proportionally less below
# Requests per copied image: GetObject metadata, HeadObject image, and per object HeadObject + CopyObject.
REQUESTS_PER_IMAGE = 6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _client():
    import boto3

    return boto3.client("s3", region_name="us-east-1")


def _worker_init(endpoint: str) -> None:
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    )
    from lambdas.ingest import aws, worker  # noqa: F401  (import cost outside the timed region)

    aws.s3()


def _copy(args: tuple[list[dict[str, Any]], str, int]) -> dict[str, float]:
    """One Lambda invocation's work: a batch through the real worker code, with its CPU time."""
    from lambdas.ingest import aws, worker

    items, data_bucket, threads = args
    cpu, wall = time.process_time(), time.perf_counter()
    result = worker.process_batch(items, s3=aws.s3(), data_bucket=data_bucket, default_source=SOURCE,
                                  threads=threads)
    return {"copied": result.copied, "unchanged": result.unchanged, "records": len(result.records),
            "failures": len(result.failures), "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall}


def _seed(s3, copies: int) -> list[str]:
    """The sample, ``copies`` times under distinct ids (same bytes), so a run has enough distinct objects."""
    s3.create_bucket(Bucket=SOURCE)
    ids = []
    for path in sorted((SAMPLE_DIR / "bin-images").glob("*.jpg")):
        photo, metadata = path.read_bytes(), (SAMPLE_DIR / "metadata" / f"{path.stem}.json").read_bytes()
        for copy in range(copies):
            image_id = path.stem if copy == 0 else f"{path.stem}-{copy}"
            s3.put_object(Bucket=SOURCE, Key=f"bin-images/{image_id}.jpg", Body=photo)
            s3.put_object(Bucket=SOURCE, Key=f"metadata/{image_id}.json", Body=metadata)
            ids.append(image_id)
    return ids


def _data_bucket(s3, kms_key: str) -> str:
    name = f"bench-data-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": [{
        "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key}}]})
    return name


def _measure(pool, name: str, ids: list[str], data_bucket: str, *, workers: int, threads: int,
             batch: int) -> dict[str, Any]:
    items = [{"image_id": image_id, "sourceBucket": SOURCE} for image_id in ids]
    batches = [(items[i : i + batch], data_bucket, threads) for i in range(0, len(items), batch)]
    started = time.perf_counter()
    results = pool.map(_copy, batches, chunksize=1)
    seconds = time.perf_counter() - started
    copied = sum(r["copied"] for r in results)
    unchanged = sum(r["unchanged"] for r in results)
    failures = sum(r["failures"] for r in results)
    cpu_per_image = sum(r["cpu_s"] for r in results) / len(ids)
    return {
        "variant": name,
        "workers": workers,
        "threads_per_worker": threads,
        "images": len(ids),
        "batch_size": batch,
        "objects_copied": copied,
        "objects_unchanged": unchanged,
        "failures": failures,
        "seconds": round(seconds, 3),
        "objects_per_s": round((copied + unchanged) / seconds, 1),
        "images_per_s": round(len(ids) / seconds, 1),
        "worker_cpu_ms_per_image": round(cpu_per_image * 1000, 2),
    }


def run(ctx: Any = None, *, images: int | None = None, concurrent_workers: int = 4) -> dict[str, Any]:
    """Measure the variants; write bench/results/ingest.json (or ``ctx.out_dir``/ingest.json)."""
    quick = bool(getattr(ctx, "quick", False))
    images = images or (120 if quick else 240)
    copies = max(1, -(-images // 240))
    from moto.server import ThreadedMotoServer

    # One access-log line per request would drown the figures.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_KMS", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    _worker_init(endpoint)
    os.environ["AWS_ENDPOINT_URL_KMS"] = endpoint
    try:
        import boto3

        s3 = _client()
        kms_key = boto3.client("kms", region_name="us-east-1").create_key()["KeyMetadata"]["KeyId"]
        seed_started = time.perf_counter()
        ids = _seed(s3, copies)[:images]
        seed_seconds = time.perf_counter() - seed_started
        context = multiprocessing.get_context("spawn")
        variants = []
        plans = [
            ("1 worker x 1 thread", 1, 1),
            (f"1 worker x {DEPLOYED_THREADS} threads", 1, DEPLOYED_THREADS),
            (f"{concurrent_workers} workers x 1 thread", concurrent_workers, 1),
            (f"{concurrent_workers} workers x {DEPLOYED_THREADS} threads", concurrent_workers, DEPLOYED_THREADS),
        ]
        rerun_bucket = ""
        for name, workers, threads in plans:
            with context.Pool(workers, initializer=_worker_init, initargs=(endpoint,)) as pool:
                pool.map(abs, range(workers))  # every worker started and imported before the clock runs
                bucket = _data_bucket(s3, kms_key)
                batch = max(1, len(ids) // (workers * 4))
                variants.append(_measure(pool, name, ids, bucket, workers=workers, threads=threads, batch=batch))
                if workers == 1 and threads == DEPLOYED_THREADS:
                    rerun_bucket = bucket
                    variants.append(_measure(pool, f"rerun, 1 worker x {DEPLOYED_THREADS} threads (nothing to copy)",
                                             ids, bucket, workers=1, threads=threads, batch=batch))
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result = {
        "benchmark": "ingest copy workers",
        "stand_in": f"moto {_moto_version()} ThreadedMotoServer on 127.0.0.1 (one process); workers in "
        "separate processes; CopyObject is server-side in the stand-in too (no bytes through the worker)",
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": _loadavg()},
        "seed_seconds": round(seed_seconds, 2),
        "rerun_bucket_checked": bool(rerun_bucket),
        "variants": variants,
    }
    result["implications"] = implications(variants)
    out = Path(getattr(ctx, "out_dir", RESULTS.parent)) / "ingest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["written_to"] = str(out)
    return result


def implications(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """What the measured figures imply for runs in AWS. Only the CPU cost per image is carried over from the
    measurement; S3 latencies are assumptions, named as such."""
    deployed = next(v for v in variants if v["workers"] == 1 and v["threads_per_worker"] == DEPLOYED_THREADS
                    and v["objects_copied"])
    cpu_ms = deployed["worker_cpu_ms_per_image"]
    assumed_latency_ms = {"GetObject/HeadObject": 20, "CopyObject (<1 MB)": 60}
    per_image_wall_ms = 4 * assumed_latency_ms["GetObject/HeadObject"] + 2 * assumed_latency_ms["CopyObject (<1 MB)"]
    latency_bound = DEPLOYED_THREADS * 1000 / per_image_wall_ms
    cpu_bound = LAMBDA_512MB_VCPU * 1000 / cpu_ms if cpu_ms else float("inf")
    per_worker = min(latency_bound, cpu_bound)
    concurrency = 50  # ingestMaxConcurrency default
    aggregate = per_worker * concurrency
    # S3 serves 3,500 PUT/COPY and 5,500 GET/HEAD requests per second per prefix; a copy writes one object
    # into each of raw/bin-images/ and raw/metadata/, so the write ceiling is 3,500 images/s.
    aggregate = min(aggregate, 3500.0)

    def minutes(images: int) -> float:
        return round(images / aggregate / 60, 1)

    return {
        "assumed_s3_latency_ms": assumed_latency_ms,
        "measured_worker_cpu_ms_per_image": cpu_ms,
        "lambda_512mb_vcpu": round(LAMBDA_512MB_VCPU, 3),
        "per_worker_images_per_s": {"latency_bound": round(latency_bound, 1), "cpu_bound": round(cpu_bound, 1),
                                    "expected": round(per_worker, 1)},
        "max_concurrency": concurrency,
        "aggregate_images_per_s": round(aggregate, 0),
        "copy_minutes_10441": minutes(10_441),
        "copy_minutes_500000": minutes(500_000),
        "batches_10441": -(-10_441 // 100),
        "batches_500000": -(-500_000 // 100),
    }


def _moto_version() -> str:
    import moto

    return moto.__version__


def _loadavg() -> list[str]:
    with open("/proc/loadavg") as handle:
        return handle.read().split()[:3]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv

    class _Ctx:
        pass

    ctx = _Ctx()
    ctx.quick = quick  # type: ignore[attr-defined]
    ctx.out_dir = RESULTS.parent  # type: ignore[attr-defined]
    result = run(ctx)
    for variant in result["variants"]:
        print(f"{variant['variant']:<48} {variant['objects_per_s']:>8} objects/s  "
              f"{variant['images_per_s']:>7} images/s  {variant['worker_cpu_ms_per_image']:>6} ms CPU/image  "
              f"copied {variant['objects_copied']}")
    print(json.dumps(result["implications"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
