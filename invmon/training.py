"""The local trainer: ``python -m ml.train`` in a child process with SageMaker's environment variables.

The child gets what a SageMaker training container gets (``SM_CHANNEL_*``, ``SM_MODEL_DIR``,
``SM_OUTPUT_DATA_DIR``, ``SM_HOSTS``, ``SM_CURRENT_HOST``, ``SM_NUM_GPUS``, hyperparameters as ``--name value``),
so what runs here is what runs in the cloud. Its metric lines drive a progress bar.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from invmon.local import ChildProcess
from ml import abid
from ml.health import HEALTH_FILE

STEP_LINE = re.compile(r"epoch (\d+) step (\d+)/(\d+)")
SHOWN_METRICS = {"train_loss", "valid_accuracy", "valid_rmse"}
METRIC = re.compile(r"(\w+)=([-+0-9.eE]+|nan|inf);")


@dataclass
class TrainingRun:
    model_dir: Path
    output_dir: Path
    log_file: Path
    metrics: dict[str, Any]


def sagemaker_environment(channels: Mapping[str, Path], model_dir: Path, output_dir: Path) -> dict[str, str]:
    env = {f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()}
    env |= {
        "SM_MODEL_DIR": str(model_dir),
        "SM_OUTPUT_DATA_DIR": str(output_dir),
        "SM_HOSTS": json.dumps(["localhost"]),
        "SM_CURRENT_HOST": "localhost",
        "SM_NUM_GPUS": "0",
        "SM_CHANNELS": json.dumps(sorted(channels)),
    }
    return env


def hyperparameter_args(hyperparameters: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for name, value in hyperparameters.items():
        args += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def run_trainer(
    *,
    channels: Mapping[str, Path],
    workdir: Path,
    hyperparameters: Mapping[str, Any],
    epochs: int,
    description: str = "training",
) -> TrainingRun:
    """Train in a child process; raise with the log's tail when it fails."""
    model_dir, output_dir, checkpoints = workdir / "model", workdir / "output", workdir / "checkpoints"
    for folder in (model_dir, output_dir, checkpoints):
        folder.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "training.log"
    args = [sys.executable, "-m", "ml.train", "--epochs", str(epochs), "--checkpoint-dir", str(checkpoints),
            *hyperparameter_args(hyperparameters)]
    env = os.environ | sagemaker_environment(channels, model_dir, output_dir) | {"PYTHONUNBUFFERED": "1"}
    tail: list[str] = []
    with (
        open(log_file, "w") as log,
        tqdm(total=epochs, desc=description, unit="epoch", dynamic_ncols=True, disable=None) as bar,
        ChildProcess(args, env=env, stdout=subprocess.PIPE) as child,
    ):
        assert child.process.stdout is not None
        for line in child.process.stdout:
            log.write(line)
            tail = ([*tail, line.rstrip()])[-30:]
            if match := STEP_LINE.search(line):
                epoch, step, steps = (int(group) for group in match.groups())
                bar.n = min(epochs, epoch - 1 + step / max(steps, 1)) if epoch >= 1 else step / max(steps, 1)
                bar.refresh()
            elif line.startswith("epoch="):
                values = dict(METRIC.findall(line))
                bar.n = min(epochs, int(float(values.get("epoch", bar.n))))
                bar.set_postfix({k: v for k, v in values.items() if k in SHOWN_METRICS})
                if bar.disable:  # no terminal: one plain line per epoch instead of a bar
                    print(f"      {line.strip()}", flush=True)
        status = child.process.wait()
    if status != 0:
        raise RuntimeError(f"ml.train exited with status {status}; last lines of {log_file}:\n" + "\n".join(tail))
    metrics_file = output_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return TrainingRun(model_dir=model_dir, output_dir=output_dir, log_file=log_file, metrics=metrics)


def health_lines(output_dir: Path) -> list[str]:
    """What the trainer found about its own run (ml/health.py), one line per finding, for people."""
    path = output_dir / HEALTH_FILE
    if not path.exists():
        return ["training health: not recorded (no health.json)"]
    health = json.loads(path.read_text())
    findings = health.get("findings") or []
    lines = [f"training health: {health.get('status')}" + ("" if findings else " (no findings)")]
    lines += [f"  {f['severity']} {f['check']} (epoch {f.get('epoch')}): {f['message']}" for f in findings]
    return lines


def local_channels(data: Path, workdir: Path, *, validation: float = 0.15, test: float = 0.15) -> dict[str, Path]:
    """Split an ABID folder the way the pipeline does and lay each split out as a SageMaker channel."""
    records, rejected = abid.scan_folder(data)
    for item in rejected:
        print(f"skipped {item.image_id}: {item.reason}", file=sys.stderr)
    split = abid.stratified_split(records, validation_fraction=validation, test_fraction=test)
    channels = {}
    for name, part in split.items():
        channels[name] = workdir / "channels" / name
        abid.materialize_channel(part, data, channels[name])
    return channels


def parse_assignments(pairs: Sequence[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"expected NAME=VALUE, got {pair!r}")
        values[name.strip().lstrip("-")] = value.strip()
    return values


def train_locally(*, data: Path, workdir: Path, epochs: int, extra: Sequence[str]) -> int:
    channels = local_channels(data, workdir)
    run = run_trainer(channels={k: v for k, v in channels.items() if k != "test"}, workdir=workdir,
                      hyperparameters=parse_assignments(extra), epochs=epochs)
    print(f"model written to {run.model_dir}; log {run.log_file}")
    print("\n".join(health_lines(run.output_dir)))
    print(json.dumps(run.metrics, indent=2))
    return 0
