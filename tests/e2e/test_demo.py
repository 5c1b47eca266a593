"""`invmon demo` end to end on a trimmed real sample, with every non-loopback connection refused: the synthesized
pipeline runs in moto's interpreter, and its states are printed as its history reports them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lambdas.training.request import ENTRY_POINT
from ml import abid

ROOT = Path(__file__).resolve().parents[2]

# Loaded by every Python process of the run (the demo, the trainer, the endpoint) through PYTHONPATH:
# a connection anywhere but the loopback interface fails as it would on a machine without a network.
NO_NETWORK = '''
import socket

_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        raise OSError(101, f"network is unreachable (test): {address}")
    return _connect(self, address)


socket.socket.connect = _loopback_only
'''


@pytest.fixture(scope="module")
def trimmed_sample(tmp_path_factory, sample_dir: Path) -> Path:
    """Eight photos of each count 0-5 and a few more-than-five: enough to split, train briefly and count."""
    records, _ = abid.scan_folder(sample_dir)
    chosen = []
    for quantity in range(7):
        chosen += [r for r in records if min(r.quantity, 6) == quantity][:8]
    folder = tmp_path_factory.mktemp("abid-trimmed")
    abid.materialize_channel(chosen, sample_dir, folder)
    (folder / abid.RECORDS_FILE).unlink()
    return folder


def _environment(tmp_path: Path, marker: str) -> dict[str, str]:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    env = dict(os.environ)
    # Every process the demo starts (trainer, endpoint, synth and its Node) inherits this: see _left_behind.
    env["INVMON_E2E_RUN"] = marker
    env["PYTHONPATH"] = os.pathsep.join([str(guard), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    # Real credentials on a developer's machine must not matter: the demo sets its own fake ones.
    env.pop("AWS_PROFILE", None)
    return env


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _left_behind(marker: str) -> list[str]:
    """Processes still running that the demo started (directly or not): they carry its run's marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if f"INVMON_E2E_RUN={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {cmdline}")
        except OSError:
            continue
    return found


def _listening(output: str) -> list[str]:
    """The loopback servers the demo announced (moto, each endpoint) that still accept connections."""
    open_ = []
    for port in sorted(set(re.findall(r"http://127\.0\.0\.1:(\d+)", output))):
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", int(port))) == 0:
                open_.append(port)
    return open_


STATE_LINE = re.compile(r"^\s+\d\d:\d\d:\d\d \+\s*[\d.]+ s  (\w+)\s+(\S.*)$", re.MULTILINE)


def _pipeline_states(workdir: Path) -> dict[str, str]:
    """Every state of the synthesized pipeline definition the demo ran (its cdk.out), nested ones too: name -> type."""
    from invmon.execution import Resolver, load_synthesized

    synthesized = load_synthesized(workdir / "cdk.out")
    definition = Resolver(synthesized.template).definition(
        synthesized.logical_id("AWS::StepFunctions::StateMachine", "PipelineStateMachine"))
    states: dict[str, str] = {}

    def walk(found: dict) -> None:
        for name, state in found.items():
            states[name] = state["Type"]
            for branch in state.get("Branches", []):
                walk(branch["States"])
            processor = state.get("ItemProcessor") or state.get("Iterator")
            if processor:
                walk(processor["States"])

    walk(definition["States"])
    return states


def _demo(workdir: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "invmon.cli", "demo", "--data", str(data), "--epochs", "1", "--hold-out", "6",
            "--workdir", str(workdir)]


@pytest.mark.slow
def test_demo_runs_the_pipeline_end_to_end_offline_and_leaves_nothing_running(tmp_path: Path,
                                                                             trimmed_sample: Path):
    workdir, marker = tmp_path / "run", uuid.uuid4().hex
    result = subprocess.run(_demo(workdir, trimmed_sample), cwd=ROOT, env=_environment(tmp_path, marker),
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    # The pipeline's own states, printed from the execution history as they ran: every printed state is one of
    # the synthesized definition's, with its type, and the stages' Task and Map states ran in the pipeline's order.
    pipeline = _pipeline_states(workdir)
    run = out[out.index("Run the pipeline's state machine"):out.index("ExecutionSucceeded", out.index(
        "Run the pipeline's state machine"))]
    printed = STATE_LINE.findall(run)
    assert printed and all(pipeline.get(name) == kind for kind, name in printed), printed
    ran = [name for _, name in printed]
    order = ["SelectDataset", "CopyImages", "SplitDataset", "PlanShards", "PackShards", "FinishPack",
             "PrepareTraining", "TrainModel", "RecordTraining", "Decide deploy"]
    assert [name for name in ran if name in order] == order, ran
    assert {("Map", "CopyImages"), ("Map", "PackShards"), ("Task", "TrainModel")} <= set(printed)
    # The trainer ran from the task's request: its train channel is the pack stage's shards, downloaded from the
    # request's S3 prefix.
    assert re.search(r"channel train: \d+ object\(s\) from s3://\S+/shards/\S+/train/ \(S3Prefix\)", run)
    # The gate skips: the shipped model (put in service by the deploy stage beforehand) stays.
    assert "Deploy skipped" in ran and "Release model" not in ran
    table = out[out.index("photo "):]
    rows = [line for line in table.splitlines()[2:] if line.strip() and not line.startswith("The demo")]
    # Six held-back photos plus the corrupt upload, one row each.
    assert len([r for r in rows if r.startswith(("bin ", "broken"))]) == 7
    broken = next(r for r in rows if r.startswith("broken-upload.jpg"))
    assert "rejected" in broken
    statuses = []
    for row in rows:
        if row.startswith("bin "):
            found = re.search(r"\b(match|mismatch|uncounted-low-confidence)\b", row)
            assert found, row
            statuses.append(found.group(1))
    # The shipped model stays in service (the demo's one-epoch model loses the gate) and the table shows it
    # deciding, with its own operating point: not every photo is left uncounted.
    assert re.search(r"Deploy gate: compare with the model in service \(.*abid-effnet-lite0\)", out)
    assert "skip: valid_accuracy" in out
    assert {"match", "mismatch"} & set(statuses), statuses
    # The review step: every queued upload answered over HTTP, shown as reviewed, with its label files.
    answered = int(re.search(r"(\d+) photos reviewed:", out).group(1))
    assert answered >= 1 and len([r for r in rows if "reviewed: person" in r]) == answered
    assert len(re.findall(r"raw/reviewed/metadata/reviewed-\w+\.json", out)) == answered
    assert all(row.rstrip().endswith("model") for row in rows if row.startswith("bin "))
    assert re.search(r"The demo's own model on its held-out test split, 1-5 objects \(\d+ photos\): accuracy "
                     r"[01]\.\d{3}, RMSE", out)
    assert re.search(r"training health: (ok \(no findings\)|warning)", out)
    assert (workdir / "evaluation").is_dir()
    assert list((workdir / "evaluation").glob("*.png")), "evaluation plots were not written"
    assert _processes_mentioning(str(workdir)) == []
    assert _left_behind(marker) == []
    assert re.search(r"served by ml\.serve on http://127\.0\.0\.1:\d+", out)
    assert _listening(out) == []


@pytest.mark.slow
def test_ctrl_c_during_training_stops_every_child(tmp_path: Path, trimmed_sample: Path):
    workdir, marker = tmp_path / "interrupted", uuid.uuid4().hex
    process = subprocess.Popen(_demo(workdir, trimmed_sample), cwd=ROOT, env=_environment(tmp_path, marker),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 600
    seen = []
    for line in process.stdout:
        seen.append(line)
        if f"python {ENTRY_POINT}" in line:  # the TrainModel task's job starts the entry point from its code channel
            break
        assert time.monotonic() < deadline, "the demo never reached training"
    time.sleep(3)  # let the trainer start
    assert any(ENTRY_POINT in p for p in _left_behind(marker)), "the trainer should be running now"
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 130, rest[-3000:]
    time.sleep(1)
    assert _left_behind(marker) == []
    assert _listening("".join(seen) + rest) == []


def test_uploads_are_photos_the_model_in_service_never_trained_on_spread_over_the_counts(sample_dir: Path):
    from invmon.demo import SHIPPED_MODEL, consignment, hold_out, never_trained_on

    records, _ = abid.scan_folder(sample_dir)
    unseen = never_trained_on(SHIPPED_MODEL)
    assert len(unseen) == 2 * 1201  # the shipped model's validation and test photos
    dataset, held = hold_out(records, 12, unseen)
    assert len(held) == 12 and not {r.image_id for r in held} & {r.image_id for r in dataset}
    assert all(r.image_id in unseen for r in held)
    assert len({min(r.quantity, 6) for r in held}) == 7  # every count class 0-5 and "6 or more"
    # Every third consignment is off by two (never below zero); the others say what the bin holds.
    claims = [consignment(r, i) for i, r in enumerate(held)]
    for index, (record, claim) in enumerate(zip(held, claims, strict=True)):
        assert (abs(claim - record.quantity) == 2) if index % 3 == 2 else claim == record.quantity
        assert claim >= 0
