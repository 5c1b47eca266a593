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
import tarfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from tqdm import tqdm

from invmon.execution import JobOutcome, SageMakerBridge
from invmon.local import ChildProcess
from ml import abid
from ml.health import HEALTH_FILE

TRAINER_DEFAULT_EPOCHS = 12  # ml.train's --epochs default, for the progress bar only
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
    epochs: int | None,
    description: str = "training",
    arguments: Callable[[Mapping[str, Any]], list[str]] = hyperparameter_args,
    environment: Mapping[str, str] | None = None,
    started: Callable[[ChildProcess], None] = lambda child: None,
    entry: Sequence[str] = ("-m", "ml.train"),
    cwd: Path | None = None,
) -> TrainingRun:
    """Train in a child process; raise with the log's tail when it fails. ``epochs`` None leaves the number of
    epochs to the hyperparameters (or the trainer's default); ``started`` gets the child, so another thread
    can stop it. ``entry`` is what follows the interpreter (``ml.train`` from the checkout by default; a training
    job's script from its code channel, run in ``cwd``)."""
    model_dir, output_dir, checkpoints = workdir / "model", workdir / "output", workdir / "checkpoints"
    for folder in (model_dir, output_dir, checkpoints):
        folder.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "training.log"
    args = [sys.executable, *entry, *(["--epochs", str(epochs)] if epochs is not None else []),
            "--checkpoint-dir", str(checkpoints), *arguments(hyperparameters)]
    env = (os.environ | sagemaker_environment(channels, model_dir, output_dir) | dict(environment or {})
           | {"PYTHONUNBUFFERED": "1"})
    epochs = epochs if epochs is not None else int(hyperparameters.get("epochs", TRAINER_DEFAULT_EPOCHS))
    tail: list[str] = []
    with (
        open(log_file, "w") as log,
        tqdm(total=epochs, desc=description, unit="epoch", dynamic_ncols=True, disable=None) as bar,
        ChildProcess(args, env=env, stdout=subprocess.PIPE, cwd=cwd) as child,
    ):
        started(child)
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


# --- SageMaker training jobs, run here ----------------------------------------------------------------------

# SageMaker's FailureReason is at most 1,024 characters (API_DescribeTrainingJob, FailureReason: "Length
# Constraints: Maximum length of 1024").
MAX_FAILURE_REASON = 1024


def failure_reason(error: Exception) -> str:
    """``AlgorithmError: <error>`` within SageMaker's limit. A trainer's error comes last in its log (argparse's
    ``error:`` line, a traceback's exception), so a long one keeps its first line and its end."""
    reason = f"AlgorithmError: {error}"
    if len(reason) <= MAX_FAILURE_REASON:
        return reason
    first = reason.split("\n", 1)[0][: MAX_FAILURE_REASON // 4]
    gap = "\n...\n"
    return first + gap + reason[-(MAX_FAILURE_REASON - len(first) - len(gap)):]


def decode_hyperparameters(encoded: Mapping[str, str]) -> dict[str, Any]:
    """What the training toolkit makes of a job's HyperParameters (sagemaker-training 5.1.4,
    ``environment.read_hyperparameters``): each value JSON-decoded where it parses, kept as text where it does
    not; the ``sagemaker_*`` ones are the toolkit's own and never reach the entry point."""
    decoded: dict[str, Any] = {}
    for name, value in encoded.items():
        if name.startswith("sagemaker_"):
            continue
        try:
            decoded[name] = json.loads(value)
        except (ValueError, TypeError):
            decoded[name] = value
    return decoded


def toolkit_args(hyperparameters: Mapping[str, Any]) -> list[str]:
    """Hyperparameters as the toolkit passes them to the entry point (``mapping.to_cmd_args``): sorted by name,
    ``--name value`` (``-n`` for a one-letter name), values as ``str()`` gives them (``True``, ``0.001``), an
    object as ``k=v,k=v``."""
    args: list[str] = []
    for name in sorted(hyperparameters):
        value = hyperparameters[name]
        if hasattr(value, "items"):
            value = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
        args += [f"--{name}" if len(name) > 1 else f"-{name}", str(value)]
    return args


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[len("s3://"):]:
        raise ValueError(f"expected s3://bucket/key, got {uri!r}")
    bucket, key = uri[len("s3://"):].split("/", 1)
    return bucket, key


def channel_objects(s3: Any, source: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The objects a channel's ``S3DataSource`` names, as (bucket, key, path in the channel folder).

    - ``ManifestFile``: the manifest's first element is ``{"prefix": "s3://bucket/prefix/"}`` and every other is
      a key relative to it (SageMaker API reference, S3DataSource); each lands at that relative path.
    - ``S3Prefix``: every object whose key starts with the prefix; each lands at its key relative to the
      prefix's last "/" (a prefix that ends in "/" is a folder whose layout is kept; a prefix that is a whole
      key lands as that file's name, as the code channel's tarball does).
    """
    data_type = source["S3DataType"]
    bucket, key = split_uri(source["S3Uri"])
    if data_type == "ManifestFile":
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        if not isinstance(manifest, list) or not manifest or "prefix" not in manifest[0]:
            raise ValueError(f"{source['S3Uri']}: not a manifest ([{{\"prefix\": ...}}, key, ...])")
        prefix_bucket, prefix = split_uri(manifest[0]["prefix"])
        return [(prefix_bucket, prefix + relative, relative) for relative in manifest[1:]]
    if data_type == "S3Prefix":
        base = key[: key.rfind("/") + 1]
        objects = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            objects += [(bucket, item["Key"], item["Key"][len(base):]) for item in page.get("Contents", [])
                        if not item["Key"].endswith("/")]
        return objects
    raise ValueError(f"S3DataType {data_type}: the local trainer reads ManifestFile and S3Prefix channels")


def download_channel(s3: Any, source: Mapping[str, Any], folder: Path, *, description: str = "channel") -> int:
    """Downloads a channel as SageMaker's File mode does; returns how many objects it holds."""
    objects = channel_objects(s3, source)
    if not objects:
        raise ValueError(f"{source['S3Uri']}: the channel holds no objects")
    folder.mkdir(parents=True, exist_ok=True)
    resolved = folder.resolve()

    def fetch(item: tuple[str, str, str]) -> None:
        bucket, key, relative = item
        target = (folder / relative).resolve()
        if not target.is_relative_to(resolved):
            raise ValueError(f"s3://{bucket}/{key}: its path {relative!r} leaves the channel folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(tqdm(pool.map(fetch, objects), total=len(objects), desc=description, unit="obj", leave=False,
                  disable=None))
    return len(objects)


def tarball(folder: Path, target: Path) -> Path:
    """``folder``'s contents at the archive's root, as SageMaker packs /opt/ml/model into model.tar.gz."""
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return target


# Where a training container's paths live (SageMaker's /opt/ml layout); a job's folder here stands for it, as
# sagemaker-training's SAGEMAKER_BASE_DIR does.
CONTAINER_BASE = "/opt/ml/"


def container_path(path: str, job_dir: Path) -> Path:
    if not path.startswith(CONTAINER_BASE):
        raise ValueError(f"{path}: not a path inside the training container ({CONTAINER_BASE}...)")
    return job_dir / path[len(CONTAINER_BASE):]


def extract_code(tarball: Path, code_dir: Path) -> None:
    """The source tarball unpacked as the framework container unpacks it into /opt/ml/code (sagemaker-training's
    own ``files.download_and_extract`` where it is installed; the same safe extraction otherwise)."""
    try:
        from sagemaker_training import files
    except ImportError:
        code_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(code_dir, filter="data")
        return
    files.download_and_extract(uri=str(tarball), path=str(code_dir))


def isolated_environment(code_dir: Path) -> dict[str, str]:
    """What the child imports from: the code channel's files and the installed packages, as in the container.
    ``-S`` skips site's .pth files (this checkout's editable install would otherwise resolve a module that the
    tarball lacks from the checkout), so the installed packages come back through PYTHONPATH, after the code."""
    import sysconfig

    paths = dict.fromkeys([str(code_dir), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return {"PYTHONPATH": os.pathsep.join(paths)}


class LocalTrainingJobs(SageMakerBridge):
    """The demo's SageMaker: a ``createTrainingJob.sync`` task runs the job's entry point here as the PyTorch
    framework container does: the source tarball that ``sagemaker_submit_directory`` names (in the code channel)
    unpacked into the job's ``code/``, and ``python <sagemaker_program>`` run there as a script, importing only
    that code and the installed packages, never this checkout's ``ml``; in the environment a training container
    gets from the task's actual request (its channels downloaded, its hyperparameters decoded as the toolkit
    does, SM_* variables). It then writes model.tar.gz and output.tar.gz where the request's OutputDataConfig
    says (<S3OutputPath>/<job>/output/, SageMaker's layout). The job's status is the trainer's: Failed, with the
    log's tail as FailureReason, when it exits non-zero or its code cannot be found."""

    def __init__(self, workdir: Path, *, say: Callable[[str], None] = print) -> None:
        super().__init__()
        self.workdir = workdir
        self.say = say
        self.children: list[ChildProcess] = []
        self.closed = False
        self.runs: dict[str, TrainingRun] = {}

    def finish(self, operation: str, request: dict[str, Any]) -> JobOutcome:
        if operation != "CreateTrainingJob":
            return JobOutcome("Failed", f"ClientError: the local SageMaker runs training jobs, not {operation}")
        if self.closed:
            return JobOutcome("Failed", "ClientError: the local SageMaker is shutting down")
        try:
            return self._train(request)
        except Exception as error:  # any failure is the job's own, reported as SageMaker reports one
            return JobOutcome("Failed", failure_reason(error))

    def _train(self, request: dict[str, Any]) -> JobOutcome:
        name = request["TrainingJobName"]
        job_dir = self.workdir / "jobs" / name
        s3 = boto3.client("s3")
        channels: dict[str, Path] = {}
        for channel in request["InputDataConfig"]:
            folder = job_dir / "input" / "data" / channel["ChannelName"]
            source = channel["DataSource"]["S3DataSource"]
            count = download_channel(s3, source, folder, description=f"channel {channel['ChannelName']}")
            self.say(f"      channel {channel['ChannelName']}: {count} object(s) from {source['S3Uri']} "
                     f"({source['S3DataType']})")
            channels[channel["ChannelName"]] = folder
        encoded = request.get("HyperParameters", {})
        hyperparameters = decode_hyperparameters(encoded)
        try:
            program = json.loads(encoded["sagemaker_program"])
            tarball_path = container_path(json.loads(encoded["sagemaker_submit_directory"]), job_dir)
        except (KeyError, ValueError) as error:
            return JobOutcome("Failed", f"ClientError: the request names no entry point and source tarball "
                                        f"(sagemaker_program, sagemaker_submit_directory): {error}")
        if not tarball_path.is_file():
            return JobOutcome("Failed", f"ClientError: sagemaker_submit_directory {tarball_path} is in no channel")
        code_dir = job_dir / "code"
        extract_code(tarball_path, code_dir)
        if not (code_dir / program).is_file():
            return JobOutcome("Failed", f"AlgorithmError: the source tarball holds no {program}")
        self.say(f"      {name}: python {program} {' '.join(toolkit_args(hyperparameters))} (from the code channel)")
        try:
            run = run_trainer(
                channels=channels, workdir=job_dir, hyperparameters=hyperparameters, epochs=None,
                description=name, arguments=toolkit_args,
                environment={"TRAINING_JOB_NAME": name, "SM_HPS": json.dumps(hyperparameters),
                             **isolated_environment(code_dir)},
                started=self._started, entry=("-S", str(code_dir / program)), cwd=code_dir,
            )
        except RuntimeError as error:
            return JobOutcome("Failed", failure_reason(error))
        self.runs[name] = run
        for line in health_lines(run.output_dir):
            self.say(f"      {line}")
        model_uri = boto3.client("sagemaker").describe_training_job(TrainingJobName=name)["ModelArtifacts"][
            "S3ModelArtifacts"]
        expected = f"{request['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{name}/output/model.tar.gz"
        if model_uri != expected:
            raise AssertionError(f"moto's S3ModelArtifacts {model_uri} is not SageMaker's layout ({expected})")
        bucket, key = split_uri(model_uri)
        s3.upload_file(str(tarball(run.model_dir, job_dir / "model.tar.gz")), bucket, key)
        s3.upload_file(str(tarball(run.output_dir, job_dir / "output.tar.gz")), bucket,
                       key.rsplit("/", 1)[0] + "/output.tar.gz")
        return JobOutcome("Completed")

    def _started(self, child: ChildProcess) -> None:
        self.children.append(child)
        if self.closed:
            child.stop()

    def close(self) -> None:
        """Stops any trainer still running (Ctrl-C, or an error elsewhere) and refuses new jobs."""
        self.closed = True
        for child in self.children:
            child.stop()
