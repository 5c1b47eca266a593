"""What every benchmark shares: the run context, the machine description, timing statistics, and child
processes (one per measured model, so that peak memory and thread pools never mix between models)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SERVED_MODEL_DIR = ROOT / "models" / "abid-effnet-lite0"
SAMPLE_DIR = ROOT / "data" / "abid-sample"
# The held-out split of the shared ABID copy (python -m ml.data split), where the served model was trained.
SPLIT_DIR = ROOT / "runs" / "split"


@dataclass
class Context:
    """Where a benchmark run reads its inputs and writes its results, and how hard it tries."""

    quick: bool = False
    out_dir: Path = RESULTS_DIR
    model_dir: Path = SERVED_MODEL_DIR
    # How the model came to be: "served" (the shipped model dir) or "tiny dev model" (trained by the bench).
    model_provenance: str = "served"
    test_dir: Path = SAMPLE_DIR  # held-out photos: serving inputs and the accuracy check
    train_dir: Path = SAMPLE_DIR  # training photos: the training benchmark and int8 calibration
    threads: int = 0  # torch CPU threads in every child; 0 = torch's default
    variants: list[str] = field(default_factory=list)  # serving variants of our model; empty = the default list
    notes: list[str] = field(default_factory=list)

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def count_records(table: Any) -> list[dict[str, Any]]:
    """The photo records of a counts table: the table also holds consignments and the review queue's history and
    day counters (lambdas/review/), which are not counts."""
    from boto3.dynamodb.conditions import Attr

    from lambdas.count.records import photo_pk

    scan = {"FilterExpression": Attr("pk").begins_with(photo_pk(""))}
    items, response = [], table.scan(**scan)
    items += response["Items"]
    while "LastEvaluatedKey" in response:
        response = table.scan(ExclusiveStartKey=response["LastEvaluatedKey"], **scan)
        items += response["Items"]
    return items


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
        "min_ms": round(min(ms), 3) if ms else float("nan"),
    }


def time_calls(call: Callable[[int], object], iterations: int, warmup: int) -> list[float]:
    """Seconds per call of ``call(i)``, after ``warmup`` untimed calls."""
    for i in range(warmup):
        call(i)
    times = []
    for i in range(iterations):
        started = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - started)
    return times


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare figures across machines."""
    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["architecture"] = fields.get("Architecture", "").strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads_default"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    with open("/proc/loadavg") as handle:
        info["load_average_at_start"] = handle.read().split()[:3]
    return info


def busy_processes(pattern: str = "ml.train") -> list[str]:
    """Other heavy work on the machine (a training run) that would bias the figures; listed in the results."""
    result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
    own = str(os.getpid())
    return [line for line in result.stdout.splitlines() if line and not line.startswith(own) and "pgrep" not in line]


class ChildFailed(RuntimeError):
    pass


def run_child(target: str, kwargs: dict[str, Any], *, timeout: float = 600, threads: int = 0,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a fresh interpreter and return its JSON-able result, with the
    child's peak RSS (``peak_rss_mib``) added. A fresh process per model keeps peaks and caches apart."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(json.dumps({"target": target, "kwargs": kwargs, "threads": threads}, default=str))
        child_env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"} | (env or {})
        result = subprocess.run(
            [sys.executable, "-m", "bench.child", str(request), str(answer)],
            cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if result.returncode != 0 or not answer.exists():
            tail = (result.stdout + result.stderr)[-3000:]
            raise ChildFailed(f"{target} exited with {result.returncode}:\n{tail}")
        return json.loads(answer.read_text())


def write_json(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def photo_files(folder: Path, limit: int | None = None) -> list[Path]:
    files = sorted((Path(folder) / "bin-images").glob("*.jpg"))
    return files[:limit] if limit else files


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
