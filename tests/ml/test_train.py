from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ml import abid, shards
from ml import train as mltrain
from ml.model import build_model, load_model
from tests.ml.conftest import ROOT, TINY_ARGS, run_train, train_env

# What a SageMaker metric definition would use (Regex: "valid_accuracy=([0-9.]+);").
METRIC = re.compile(r"\bvalid_accuracy=([0-9.]+);.*\bvalid_rmse=([0-9.]+);")


def test_tiny_training_run_produces_a_loadable_model_and_a_serving_artifact(tiny_run: dict) -> None:
    model_dir = tiny_run["model_dir"]
    model, config = load_model(model_dir)
    assert config.num_classes == 7 and config.overflow and config.image_size == 64
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    code = model_dir / "code"
    assert (code / "inference.py").is_file() and (code / "requirements.txt").is_file()
    assert {p.name for p in (code / "ml").glob("*.py")} >= {"__init__.py", "inference.py", "model.py", "data.py"}
    assert json.loads((model_dir / "history.json").read_text())[0]["epoch"] == 1


def test_the_saved_model_is_the_weight_average_and_the_product_head_stays_in_training(tiny_run: dict) -> None:
    checkpoint = torch.load(tiny_run["base"] / "checkpoints" / "checkpoint.pt", weights_only=False)
    average = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
    saved, config = load_model(tiny_run["model_dir"])
    saved_head = saved.state_dict()["_fc.weight"].float()
    assert torch.allclose(saved_head, average["_fc.weight"].float(), atol=1e-3)
    assert not torch.allclose(saved_head, checkpoint["model"]["_fc.weight"].float(), atol=1e-3)
    # Distinct products: 0..max_count and "more", predicted from the same 1280 features, never served.
    assert checkpoint["products"]["weight"].shape == (config.num_classes, 1280)
    assert not any("products" in name for name in saved.state_dict())


def test_the_weight_average_spans_the_same_epochs_whatever_the_data_size_or_number_of_hosts(tiny_run: dict) -> None:
    # 7,196 photos in batches of 32 on one host, on four hosts, and a quarter of them on four hosts.
    for steps_per_epoch in (225, 57, 15):
        steps_spanned = 1 / (1 - mltrain.ema_decay(2.25, steps_per_epoch))
        assert steps_spanned == pytest.approx(2.25 * steps_per_epoch)
    # The tiny run: 32 photos in batches of 8 is 4 steps an epoch, so 9 steps for the default 2.25 epochs.
    assert "weight average over 2.25 epochs: decay 0.88889 per step" in tiny_run["log"]


def test_metrics_are_printed_for_metric_definitions_and_written_as_json(tiny_run: dict) -> None:
    matches = [METRIC.search(line) for line in tiny_run["log"].splitlines()]
    matches = [m for m in matches if m]
    assert matches, tiny_run["log"]
    accuracy = float(matches[-1].group(1))
    metrics = json.loads((tiny_run["output_dir"] / "metrics.json").read_text())
    assert 0.0 <= metrics["valid_accuracy"] <= 1.0 and metrics["valid_rmse"] >= 0.0
    assert metrics["valid_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert metrics["train_images"] == 32
    # Every figure the training stage's metric definitions scrape is on the epoch line.
    epoch_line = next(line for line in tiny_run["log"].splitlines() if line.startswith("epoch=1;"))
    for name in ("epoch", "train_loss", "valid_loss", "valid_accuracy", "valid_rmse", "valid_mae"):
        assert re.search(rf"\b{name}=[0-9.]+;", epoch_line), name


def test_serving_code_in_the_artifact_imports_without_the_repository(tiny_model_dir: Path, sample_photo: bytes,
                                                                      tmp_path: Path) -> None:
    # The serving container only has model.tar.gz: run its code/inference.py from a copy, away from the repo.
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (tmp_path / "photo.jpg").write_bytes(sample_photo)
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1] + '/code'); import inference as i; "
        "m = i.model_fn(sys.argv[1]); body = open(sys.argv[2], 'rb').read(); "
        "print(i.output_fn(i.predict_fn(i.input_fn(body, 'image/jpeg'), m), 'application/json'))"
    )
    result = subprocess.run([sys.executable, "-c", script, str(copy), str(tmp_path / "photo.jpg")], cwd=tmp_path,
                            env=train_env({"PYTHONPATH": ""}), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["count"] in answer["classes"]


def test_sagemaker_training_toolkit_runs_the_entry_point_as_a_script(sample_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("sagemaker_training")
    train_command = Path(sys.executable).parent / "train"
    if not train_command.exists():
        pytest.skip("sagemaker-training's `train` command is not installed")
    base = tmp_path / "opt_ml"
    shutil.copytree(ROOT / "ml", base / "code" / "ml", ignore=shutil.ignore_patterns("__pycache__"))
    records, _ = abid.scan_folder(sample_dir)
    abid.materialize_channel(records[:40], sample_dir, base / "input" / "data" / "train")
    config = base / "input" / "config"
    config.mkdir(parents=True)
    hyperparameters = {
        "sagemaker_program": "ml/train.py",
        "sagemaker_submit_directory": str(base / "code"),
        "checkpoint-dir": str(tmp_path / "checkpoints"),
    }
    for flag, value in zip(TINY_ARGS[::2], TINY_ARGS[1::2], strict=True):
        hyperparameters[flag.removeprefix("--")] = value
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    # "localhost": the toolkit waits until every host name resolves, and algo-1 never does here.
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "localhost", "hosts": ["localhost"], "network_interface_name": "lo"}))
    (config / "inputdataconfig.json").write_text(json.dumps({"train": {"TrainingInputMode": "File"}}))
    env = train_env({"SAGEMAKER_BASE_DIR": str(base), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    result = subprocess.run([str(train_command)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, config_ = load_model(base / "model")
    assert config_.num_classes == 7
    assert (base / "model" / "code" / "inference.py").is_file()
    assert json.loads((base / "output" / "data" / "metrics.json").read_text())["train_images"] == 32


def test_script_mode_entry_point_works_like_the_module(sample_dir: Path, tmp_path: Path) -> None:
    result = run_train([*TINY_ARGS, "--limit", "8", "--train", str(sample_dir), "--model-dir", str(tmp_path / "m"),
                        "--output-data-dir", str(tmp_path / "o"), "--checkpoint-dir", str(tmp_path / "c")],
                       module=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "model.pth").is_file()


RESUME_ARGS = ["--epochs", "3", "--limit", "32", "--batch-size", "8", "--image-size", "64", "--freeze-blocks", "8",
               "--log-interval", "1", "--threads", "1"]


def _final_state(checkpoint_dir: Path) -> dict:
    return torch.load(checkpoint_dir / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_sigterm_checkpoints_mid_epoch_and_a_restart_resumes_without_lost_work(sample_dir: Path,
                                                                               tmp_path: Path) -> None:
    common = [*RESUME_ARGS, "--train", str(sample_dir)]
    reference = tmp_path / "reference"
    result = run_train([*common, "--model-dir", str(reference / "m"), "--output-data-dir", str(reference / "o"),
                        "--checkpoint-dir", str(reference / "c")])
    assert result.returncode == 0, result.stderr

    run = tmp_path / "interrupted"
    args = [*common, "--model-dir", str(run / "m"), "--output-data-dir", str(run / "o"), "--checkpoint-dir",
            str(run / "c")]
    process = subprocess.Popen([sys.executable, "-m", "ml.train", *args], cwd=ROOT, env=train_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch 1 step 1/4"):  # second epoch, first step done
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, "".join(lines)
    stopped = re.search(r"stopped at epoch (\d+) step (\d+)", "".join(lines))
    assert stopped and stopped.group(1) == "1" and 1 <= int(stopped.group(2)) < 4, "".join(lines)
    saved = _final_state(run / "c")
    assert (saved["epoch"], saved["step"]) == (1, int(stopped.group(2)))
    assert not (run / "o" / "metrics.json").exists()

    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'c' / 'checkpoint.pt'}: epoch 1 step {stopped.group(2)}" in resumed.stdout
    # No lost and no repeated work: the resumed run ends with exactly the weights of the uninterrupted one.
    expected, got = _final_state(reference / "c"), _final_state(run / "c")
    assert got["global_step"] == expected["global_step"] == 12
    for part in ("model", "ema", "products"):
        for name, tensor in expected[part].items():
            assert torch.allclose(tensor.float(), got[part][name].float(), atol=1e-5), (part, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_ARGS = ["--epochs", "1", "--limit", "32", "--image-size", "64", "--freeze-blocks", "8", "--threads", "1",
            "--augment", "false", "--dropout", "0", "--drop-connect", "0", "--log-interval", "1"]


def test_two_process_ddp_run_completes_and_agrees_with_one_process(sample_dir: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    result = run_train([*DDP_ARGS, "--batch-size", "8", "--train", str(sample_dir), "--model-dir", str(single / "m"),
                        "--output-data-dir", str(single / "o"), "--checkpoint-dir", str(single / "c")])
    assert result.returncode == 0, result.stderr

    hosts = '["algo-1", "algo-2"]'
    port = str(_free_port())
    processes = []
    for host in ("algo-1", "algo-2"):
        out = tmp_path / host
        env = train_env({"SM_HOSTS": hosts, "SM_CURRENT_HOST": host, "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": port, "SM_NUM_GPUS": "0"})
        # Half the batch per process: the same 8 photos per step as the single process, split over ranks.
        args = [*DDP_ARGS, "--batch-size", "4", "--train", str(sample_dir), "--model-dir", str(out / "m"),
                "--output-data-dir", str(out / "o"), "--checkpoint-dir", str(out / "c")]
        processes.append(subprocess.Popen([sys.executable, "-m", "ml.train", *args], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 240
    logs = [p.communicate(timeout=max(1, deadline - time.time()))[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(logs)
    assert "with 2 process(es)" in logs[0]
    assert "rank 0/2: 16 images in 4 batches" in logs[0]
    assert "rank 1/2: 16 images in 4 batches" in logs[1]

    one = _final_state(single / "c")["model"]
    two = _final_state(tmp_path / "algo-1" / "c")["model"]
    rank1_ckpt = tmp_path / "algo-2" / "c" / "checkpoint-rank1.pt"
    assert rank1_ckpt.is_file()
    torch.manual_seed(1)  # the run's --seed: the same initial head as both runs had
    initial = build_model(7, freeze_blocks=8, dropout=0, drop_connect=0).state_dict()
    trained = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, one[k])]
    assert trained, "the single-process run changed nothing"
    delta_one = torch.cat([(one[k] - initial[k]).flatten() for k in trained])
    delta_two = torch.cat([(two[k] - initial[k]).flatten() for k in trained])
    cosine = torch.nn.functional.cosine_similarity(delta_one, delta_two, dim=0).item()
    # Same photos per step, gradients averaged across ranks: the updates agree up to BatchNorm seeing
    # 4 photos per rank instead of 8.
    assert cosine > 0.9, cosine


def test_validation_without_an_overflow_class_scores_photos_beyond_it_as_wrong_not_as_a_crash() -> None:
    from ml.model import ModelConfig
    from ml.train import validation_metrics

    config = ModelConfig(num_classes=6, overflow=False)  # classes 0-5, trained on 1-5 photos only
    quantities = torch.tensor([1, 2, 5, 7, 12])
    logits = torch.nn.functional.one_hot(torch.tensor([1, 2, 5, 5, 5]), 6).float() * 5
    metrics = validation_metrics(logits, quantities, config, (1, 5))
    assert metrics["valid_full_n"] == 3 and metrics["valid_full_accuracy"] == 1.0
    assert metrics["valid_n"] == 3 and metrics["valid_accuracy"] == 1.0
    wide = validation_metrics(logits, quantities, config, (1, 12))
    assert wide["valid_n"] == 5 and wide["valid_accuracy"] == pytest.approx(0.6)


def test_photos_without_a_product_list_add_nothing_to_the_products_loss() -> None:
    from ml.abid import AbidRecord

    records = [AbidRecord("1", 3, 2), AbidRecord("2", 5, None), AbidRecord("3", 9, 8)]
    target = mltrain.product_targets(records, max_count=5)
    assert target.tolist() == [2, mltrain.UNKNOWN_PRODUCTS, 6]
    logits = torch.randn(3, 7, requires_grad=True)
    loss = mltrain.product_loss(logits, target)
    known = torch.nn.functional.cross_entropy(logits[[0, 2]], target[[0, 2]])
    assert torch.allclose(loss, known)
    # The unknown photo's logits get no gradient: it teaches neither "0 products" nor anything else.
    loss.backward()
    assert logits.grad[1].abs().sum() == 0
    # A batch with no known product list gives a loss of 0, not NaN.
    empty = mltrain.product_loss(torch.randn(2, 7), torch.full((2,), mltrain.UNKNOWN_PRODUCTS))
    assert empty.item() == 0.0


# --- shard channels (issue 19) ---------------------------------------------------------------------------

SHARD_ARGS = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "--freeze-blocks", "8", "--threads", "1",
              "--log-interval", "1"]


@pytest.fixture(scope="module")
def photo_folder(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 photos of the sample as a channel folder (records.jsonl in image-id order)."""
    records, _ = abid.scan_folder(sample_dir)
    folder = tmp_path_factory.mktemp("photos") / "folder"
    abid.materialize_channel(records[:30], sample_dir, folder)
    return folder


def _train(args: list[str], out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = run_train([*args, "--model-dir", str(out / "m"), "--output-data-dir", str(out / "o"),
                        "--checkpoint-dir", str(out / "c")], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _assert_same_training(one: Path, two: Path) -> None:
    first, second = _final_state(one / "c"), _final_state(two / "c")
    assert first["global_step"] == second["global_step"] > 0
    for part in ("model", "ema", "products"):
        for name, tensor in first[part].items():
            assert torch.equal(tensor, second[part][name]), (part, name)
    metrics = [json.loads((run / "o" / "metrics.json").read_text()) for run in (one, two)]
    for key in ("valid_loss", "valid_accuracy", "valid_rmse", "train_images", "train_rejected", "effective_lr"):
        assert metrics[0].get(key) == metrics[1].get(key), key


@pytest.mark.parametrize(("mode", "photos_per_shard"), [("memory", 7), ("stream", 1000)])
def test_training_from_shards_is_identical_to_training_from_their_folder(photo_folder: Path, tmp_path: Path,
                                                                         mode: str, photos_per_shard: int) -> None:
    # The memory path is the same whatever the shard boundaries; a stream is the same when the shards have the
    # boundaries a streamed folder has (ml.channel.FOLDER_PART_PHOTOS).
    packed = tmp_path / "shards"
    shards.pack_folder(photo_folder, packed, "train", photos_per_shard)
    runs = {}
    for name, channel_dir in (("folder", photo_folder), ("shards", packed)):
        # Validated on rank 0 from the same channel: the memory path's loader reads validation shards too.
        validation = ["--validation", str(channel_dir)] if mode == "memory" else []
        result = _train([*SHARD_ARGS, "--data-mode", mode, "--train", str(channel_dir), *validation], tmp_path / name)
        assert f"data mode: {mode}" in result.stdout
        runs[name] = tmp_path / name
    _assert_same_training(runs["folder"], runs["shards"])
    assert json.loads((runs["shards"] / "o" / "metrics.json").read_text())["train_images"] == 30


def test_a_stream_stopped_mid_epoch_resumes_where_it_stopped_with_the_weights_of_an_uninterrupted_run(
        photo_folder: Path, tmp_path: Path) -> None:
    packed = tmp_path / "shards"
    shards.pack_folder(photo_folder, packed, "train", 7)
    common = [*SHARD_ARGS, "--data-mode", "stream", "--train", str(packed), "--shuffle-buffer", "5"]
    _train(common, tmp_path / "reference")
    stopped = _train([*common, "--max-steps", "3"], tmp_path / "resumed")
    assert "stopped at epoch 0 step 3" in stopped.stdout
    resumed = _train(common, tmp_path / "resumed")
    assert "resumed from" in resumed.stdout and "epoch 0 step 3" in resumed.stdout
    expected, got = _final_state(tmp_path / "reference" / "c"), _final_state(tmp_path / "resumed" / "c")
    assert got["global_step"] == expected["global_step"]
    for part in ("model", "ema", "products"):
        for name, tensor in expected[part].items():
            assert torch.equal(tensor, got[part][name]), (part, name)


def test_a_corrupt_photo_in_a_shard_is_rejected_with_its_reason_and_counted(photo_folder: Path, tmp_path: Path,
                                                                           sample_photo: bytes) -> None:
    packed = tmp_path / "shards"
    written, _ = shards.pack_folder(photo_folder, packed, "train", 1000)
    metadata = (photo_folder / "metadata" / f"{abid.scan_folder(photo_folder)[0][0].image_id}.json").read_bytes()
    (packed / shards.shard_name("train", len(written))).write_bytes(shards.pack([
        shards.Sample("99901", b"\xff\xd8 not a jpeg", metadata), shards.Sample("99902", sample_photo, metadata)]))
    result = _train([*SHARD_ARGS, "--data-mode", "stream", "--train", str(packed)], tmp_path / "run")
    assert "rejected 99901: not a decodable image" in result.stdout
    metrics = json.loads((tmp_path / "run" / "o" / "metrics.json").read_text())
    assert (metrics["train_images"], metrics["train_rejected"]) == (31, 1)


@pytest.mark.parametrize(("distribution", "empty_host"), [("replicated", False), ("sharded", False),
                                                        ("sharded", True)])
def test_a_two_process_ddp_run_from_shards_sees_every_photo_of_each_epoch_exactly_once(
        photo_folder: Path, tmp_path: Path, distribution: str, empty_host: bool) -> None:
    packed = tmp_path / "shards"
    written, _ = shards.pack_folder(photo_folder, packed, "train", 7)  # 7, 7, 7, 7, 2 photos: uneven ranks
    hosts = ("algo-1", "algo-2")
    channels = {host: packed for host in hosts}
    if distribution == "sharded":
        # What ShardedByS3Key hands each host: its own subset of the files (none for a host beyond the files).
        for index, host in enumerate(hosts):
            channels[host] = tmp_path / f"{host}-channel"
            channels[host].mkdir()
            for path in written if empty_host else written[index::2]:
                if not (empty_host and index == 1):
                    shutil.copyfile(path, channels[host] / path.name)
    port = str(_free_port())
    processes = []
    for host in hosts:
        env = train_env({"SM_HOSTS": json.dumps(list(hosts)), "SM_CURRENT_HOST": host, "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": port, "SM_NUM_GPUS": "0"})
        out = tmp_path / host
        args = [*SHARD_ARGS, "--epochs", "2", "--batch-size", "4", "--data-mode", "stream",
                "--data-distribution", distribution, "--record-ids", "true", "--workers", "1", "--shuffle-buffer", "5",
                "--train", str(channels[host]),
                "--model-dir", str(out / "m"), "--output-data-dir", str(out / "o"), "--checkpoint-dir", str(out / "c")]
        processes.append(subprocess.Popen([sys.executable, "-m", "ml.train", *args], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 240
    logs = [p.communicate(timeout=max(1, deadline - time.time()))[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(logs)
    assert "batch 4 per process x 2 = 8" in logs[0]
    consumed = [json.loads((tmp_path / host / "o" / f"consumed-rank{rank}.json").read_text())
                for rank, host in enumerate(hosts)]
    everything = sorted(r.image_id for r in abid.scan_folder(photo_folder)[0])
    for epoch in ("0", "1"):
        ids = [c["ids"][epoch] for c in consumed]
        assert sorted(ids[0] + ids[1]) == everything, epoch
        assert len(ids[0]) != len(ids[1])  # uneven, and neither rank hung
        # The rank that ran out first took fewer optimiser steps; after the epoch both hold the same weights,
        # Adam moments and weight average, so their next updates agree.
        assert consumed[0]["digest"][epoch] == consumed[1]["digest"][epoch], epoch
    assert json.loads((tmp_path / "algo-1" / "o" / "metrics.json").read_text())["train_images"] == 30


def test_the_epoch_line_shows_the_few_figures_a_person_reads_and_the_rest_goes_to_a_detail_line(
        tiny_run: dict) -> None:
    from ml.train import EPOCH_LINE

    lines = tiny_run["log"].splitlines()
    epoch_line = next(line for line in lines if line.startswith("epoch=1;"))
    names = [part.split("=", 1)[0].strip() for part in epoch_line.split(";") if "=" in part]
    assert set(names) <= set(EPOCH_LINE) and "valid_accuracy" in names
    detail_line = next(line for line in lines if line.startswith("epoch detail: "))
    detail = json.loads(detail_line.removeprefix("epoch detail: "))
    assert {"valid_within1", "valid_full_accuracy"} <= set(detail)
