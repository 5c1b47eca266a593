"""Cold start of the Lambdas: import time of each handler module in a fresh interpreter, the size of the code
asset, and the count Lambda's time per record against local stand-ins (moto's server for S3, DynamoDB and
EventBridge; ``ml.serve`` with the model for the SageMaker runtime).

The handlers are the ``lambdas.*`` dotted paths that ``infra/`` hands to ``PythonFunction``. The code asset
is ``lambdas/`` + ``ml/__init__.py`` + ``ml/abid.py`` (infra/function.py) and is the same zip for every
function; the Powertools layer (and boto3 in the runtime) are provided by AWS and not counted.
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from bench import common

HANDLER_PATTERN = re.compile(r"""["'](lambdas(?:\.\w+)+)\.(\w+)["']""")
ASSET_EXTRA = ("ml/__init__.py", "ml/abid.py")
# The environment a handler module may read at import time; values are placeholders, nothing is called.
IMPORT_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "offline",
    "AWS_SECRET_ACCESS_KEY": "offline",
    "AWS_EC2_METADATA_DISABLED": "true",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "POWERTOOLS_SERVICE_NAME": "bench",
    "POWERTOOLS_METRICS_NAMESPACE": "invmon-bench",
    "DATA_BUCKET": "bench-data",
    "COUNTS_TABLE": "bench-counts",
    "IDEMPOTENCY_TABLE": "bench-idempotency",
    "ENDPOINT_NAME": "bench-endpoint",
}


def handlers() -> list[str]:
    """Every ``lambdas.<module>.<function>`` named in infra/, sorted."""
    found = set()
    for source in sorted((common.ROOT / "infra").glob("*.py")):
        for module, function in HANDLER_PATTERN.findall(source.read_text()):
            found.add(f"{module}.{function}")
    return sorted(found)


def asset_files() -> list[Path]:
    files = [p for p in sorted((common.ROOT / "lambdas").rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return files + [common.ROOT / name for name in ASSET_EXTRA]


def package_size() -> dict[str, Any]:
    files = asset_files()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, path.relative_to(common.ROOT).as_posix())
    per_folder: dict[str, int] = {}
    for path in files:
        relative = path.relative_to(common.ROOT).parts
        folder = "/".join(relative[:2]) if relative[0] == "lambdas" and len(relative) > 2 else relative[0]
        per_folder[folder] = per_folder.get(folder, 0) + path.stat().st_size
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "zip_bytes": len(buffer.getvalue()),
        "bytes_by_folder": dict(sorted(per_folder.items())),
        "note": "one asset shared by every function; the Powertools layer and the runtime's boto3 are not counted",
    }


_IMPORT_PROBE = (
    "import time, importlib, sys, json; t = time.perf_counter(); importlib.import_module(sys.argv[1]); "
    "print(json.dumps({'import_s': time.perf_counter() - t, 'modules': len(sys.modules)}))"
)


def import_time(module: str, repeats: int) -> dict[str, Any]:
    """Median over fresh interpreters: the import alone, and the whole process (interpreter start + import)."""
    env = os.environ | IMPORT_ENV | {"PYTHONDONTWRITEBYTECODE": "1"}
    imports, walls, modules = [], [], 0
    error = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, module], cwd=common.ROOT, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
            break
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        imports.append(answer["import_s"])
        walls.append(wall)
        modules = answer["modules"]
    if error:
        return {"module": module, "error": error}
    return {"module": module, "import_ms_p50": round(statistics.median(imports) * 1000, 1),
            "process_ms_p50": round(statistics.median(walls) * 1000, 1), "modules_loaded": modules,
            "repeats": repeats}


def interpreter_baseline(repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
        walls.append(time.perf_counter() - started)
    return round(statistics.median(walls) * 1000, 1)


# --- the count Lambda against local stand-ins --------------------------------------------------------------


class _Context:
    """The few LambdaContext attributes Powertools reads."""

    function_name = "bench-count"
    function_version = "$LATEST"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench-count"

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def _s3_message(bucket: str, key: str, size: int) -> str:
    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "awsRegion": "us-east-1",
        "s3": {"bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": key, "size": size, "sequencer": uuid.uuid4().hex[:16].upper()}},
    }]})


def _sqs_event(bodies: list[str]) -> dict[str, Any]:
    return {"Records": [{
        "messageId": str(uuid.uuid4()), "receiptHandle": "bench", "body": body, "attributes": {},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:bench-uploads", "awsRegion": "us-east-1",
    } for body in bodies]}


def count_per_record(model_dir: str, photos_dir: str, photos: int = 40, batch_size: int = 10) -> dict[str, Any]:
    """The count handler on SQS batches of S3 upload events; every photo is really read, sent to the local
    endpoint, stored and compared. Per record = batch time / batch size."""
    from invmon.local import LOOPBACK, ChildProcess, MotoServer, free_port, patched_environ, wait_for_http

    files = common.photo_files(Path(photos_dir), photos)
    port = free_port()
    endpoint_url = f"http://{LOOPBACK}:{port}"
    with MotoServer(), ChildProcess(
        [sys.executable, "-m", "ml.serve", "--model-dir", model_dir, "--port", str(port)],
        env=os.environ | {"CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.DEVNULL,
    ) as endpoint:
        wait_for_http(f"{endpoint_url}/ping", timeout=180, process=endpoint.process)
        env = IMPORT_ENV | {"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": endpoint_url, "POWERTOOLS_METRICS_NAMESPACE": "bench",
                            "AWS_ACCESS_KEY_ID": "offline", "AWS_SECRET_ACCESS_KEY": "offline"}
        with patched_environ(env):
            import boto3

            s3 = boto3.client("s3")
            dynamodb = boto3.client("dynamodb")
            bucket = env["DATA_BUCKET"]
            s3.create_bucket(Bucket=bucket)
            dynamodb.create_table(TableName=env["COUNTS_TABLE"], BillingMode="PAY_PER_REQUEST",
                                  AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                                        {"AttributeName": "sk", "AttributeType": "S"}],
                                  KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                             {"AttributeName": "sk", "KeyType": "RANGE"}])
            dynamodb.create_table(TableName=env["IDEMPOTENCY_TABLE"], BillingMode="PAY_PER_REQUEST",
                                  AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                                  KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}])
            messages = []
            for index, path in enumerate(files):
                key = f"incoming/bench/{path.name}"
                body = path.read_bytes()
                s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"expected-count": str(index % 6)})
                messages.append(_s3_message(bucket, key, len(body)))

            runtime = boto3.client("sagemaker-runtime")
            direct = common.time_calls(lambda i: runtime.invoke_endpoint(
                EndpointName=env["ENDPOINT_NAME"], ContentType="image/jpeg", Accept="application/json",
                Body=files[i % len(files)].read_bytes())["Body"].read(), min(20, len(files)), 2)

            started = time.perf_counter()
            from lambdas.count import handler as count_handler

            import_s = time.perf_counter() - started
            count_handler.reset()
            batch_times, failures = [], 0
            for start in range(0, len(messages), batch_size):
                chunk = messages[start : start + batch_size]
                started = time.perf_counter()
                response = count_handler.handler(_sqs_event(chunk), _Context())
                batch_times.append((time.perf_counter() - started, len(chunk)))
                failures += len(response.get("batchItemFailures", []))
            stored = common.count_records(boto3.resource("dynamodb").Table(env["COUNTS_TABLE"]))
            statuses: dict[str, int] = {}
            for item in stored:
                statuses[item.get("status", "?")] = statuses.get(item.get("status", "?"), 0) + 1
    first_s, first_n = batch_times[0]
    warm = [seconds / n for seconds, n in batch_times[1:]]
    direct_p50 = common.percentile(direct, 50)
    warm_p50 = common.percentile(warm, 50) if warm else float("nan")
    return {
        "photos": len(files),
        "batch_size": batch_size,
        "handler_import_ms": round(import_s * 1000, 1),
        "first_batch_ms_per_record": round(first_s / first_n * 1000, 1),
        "warm_ms_per_record_p50": round(warm_p50 * 1000, 1),
        "endpoint_direct_ms_p50": round(direct_p50 * 1000, 1),
        "lambda_overhead_ms_per_record_p50": round((warm_p50 - direct_p50) * 1000, 1),
        "batch_item_failures": failures,
        "records_stored": len(stored),
        "statuses": statuses,
        "stand_ins": "moto ThreadedMotoServer (S3, DynamoDB, EventBridge) + ml.serve (model on CPU)",
    }


def run(ctx: common.Context) -> dict[str, Any]:
    repeats = ctx.scale(5, 1)
    names = handlers()
    modules = sorted({name.rsplit(".", 1)[0] for name in names})
    print(f"  coldstart: {len(modules)} handler modules", flush=True)
    imports = [import_time(module, repeats) for module in modules]
    result: dict[str, Any] = {
        "handlers": names,
        "interpreter_ms_p50": interpreter_baseline(repeats),
        "imports": imports,
        "package": package_size(),
        "python_here": sys.version.split()[0],
        "note": "measured on this machine's CPython with the venv's boto3/Powertools; Lambda runs Python 3.14 on "
                "arm64 with the Powertools layer, so absolute figures there differ",
    }
    try:
        result["count"] = common.run_child(
            "bench.coldstart:count_per_record",
            {"model_dir": str(ctx.model_dir), "photos_dir": str(ctx.test_dir), "photos": ctx.scale(40, 4),
             "batch_size": ctx.scale(10, 2)},
            threads=ctx.threads, timeout=900)
        count = result["count"]
        print(f"  coldstart count: {count['warm_ms_per_record_p50']} ms per record warm "
              f"(endpoint {count['endpoint_direct_ms_p50']} ms), {count['records_stored']} stored", flush=True)
    except common.ChildFailed as error:
        result["count_error"] = str(error)[-1500:]
        print(f"  coldstart count: FAILED ({str(error).splitlines()[0]})", flush=True)
    return result
