"""Fixtures for the ml tests: a tiny model trained once per session on the shipped sample."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Small enough to train in seconds on two shared cores, real enough to exercise every code path.
TINY_ARGS = [
    "--epochs", "1", "--limit", "32", "--batch-size", "8", "--image-size", "64",
    "--freeze-blocks", "8", "--log-interval", "1", "--threads", "1",
    # --lr is the rate at this global batch: the tiny runs train at the recipe's rate, unscaled.
    "--lr-reference-batch", "8",
]


def run_train(args: list[str], env: dict[str, str] | None = None, *, module: bool = True,
              timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ml.train"] if module else [sys.executable, str(ROOT / "ml" / "train.py")]
    return subprocess.run(
        command + args, cwd=ROOT, env=train_env(env), capture_output=True, text=True, timeout=timeout, check=False
    )


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update({"PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"})
    return env | (extra or {})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> dict[str, Path | str]:
    """One real ``python -m ml.train`` run on the sample through the SM_* variables."""
    base = tmp_path_factory.mktemp("tiny")
    env = {
        "SM_CHANNEL_TRAIN": str(sample_dir),
        "SM_CHANNEL_VALIDATION": str(sample_dir),
        "SM_MODEL_DIR": str(base / "model"),
        "SM_OUTPUT_DATA_DIR": str(base / "output"),
        "SM_HOSTS": '["localhost"]',
        "SM_CURRENT_HOST": "localhost",
        "SM_NUM_GPUS": "0",
    }
    result = run_train([*TINY_ARGS, "--checkpoint-dir", str(base / "checkpoints")], env)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"base": base, "model_dir": base / "model", "output_dir": base / "output", "log": result.stdout}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_run: dict) -> Path:
    return tiny_run["model_dir"]


@pytest.fixture(scope="session")
def sample_photo(sample_dir: Path) -> bytes:
    return sorted((sample_dir / "bin-images").glob("*.jpg"))[0].read_bytes()
