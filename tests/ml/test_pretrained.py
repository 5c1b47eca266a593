from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ml.pretrained import TRAINER_NETWORK, pick_weights, weights_path


def test_the_trainers_weights_come_from_the_installed_wheel_without_importing_torch() -> None:
    path = weights_path()
    assert path.is_file() and path.name.startswith(TRAINER_NETWORK) and path.suffix == ".pth"
    # cdk synth finds this file for the stack's asset; it must not pay for a torch import.
    check = "import sys, ml.pretrained; ml.pretrained.weights_path(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], cwd=Path(__file__).parents[2], check=True)


def test_an_unknown_network_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="resnet-50"):
        weights_path("resnet-50")


def test_a_channel_with_several_networks_gives_each_its_own_weights(tmp_path: Path) -> None:
    for name in ("efficientnet-lite0-57934424.pth", "efficientnet-lite2-9656183e.pth"):
        (tmp_path / name).write_bytes(b"")
    assert pick_weights(tmp_path, "efficientnet-lite2").name == "efficientnet-lite2-9656183e.pth"
    assert pick_weights(tmp_path, "efficientnet-lite0").name == "efficientnet-lite0-57934424.pth"
    with pytest.raises(FileNotFoundError, match="efficientnet-lite1"):
        pick_weights(tmp_path, "efficientnet-lite1")


def test_a_channel_with_ones_own_checkpoint_uses_it_but_never_another_networks(tmp_path: Path) -> None:
    (tmp_path / "efficientnet-lite0-57934424.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no ImageNet weights for efficientnet-lite2"):
        pick_weights(tmp_path, "efficientnet-lite2")
    (tmp_path / "imagenet.pth").write_bytes(b"")
    assert pick_weights(tmp_path, "efficientnet-lite2").name == "imagenet.pth"
