from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml.model import EfficientNetLite0, ModelConfig, build_model, load_model, pretrained_weights_path, save_model


def test_self_contained_lite0_reproduces_the_reference_implementation() -> None:
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    reference = reference_package.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(pretrained_weights_path())
    ).eval()
    ours = EfficientNetLite0(num_classes=1000)
    ours.load_state_dict(torch.load(pretrained_weights_path(), weights_only=True))
    ours.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(reference(x), ours(x), atol=1e-4)


def test_any_image_size_runs_through_the_network() -> None:
    model = build_model(7, pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 7)


def test_frozen_blocks_get_no_gradient_and_keep_their_statistics() -> None:
    model = build_model(7, freeze_blocks=5).train()
    before = model._blocks[2]._bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    assert model._conv_stem.weight.grad is None and model._blocks[4]._project_conv.weight.grad is None
    assert model._blocks[5]._project_conv.weight.grad is not None
    assert torch.equal(before, model._blocks[2]._bn1.running_mean)


def test_fp16_saved_model_predicts_like_the_trained_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(7).eval()
    config = ModelConfig(num_classes=7, image_size=64, model_id="m-1")
    save_model(model, config, tmp_path)
    loaded, loaded_config = load_model(tmp_path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x).softmax(1), loaded(x).softmax(1), atol=5e-3)
    assert loaded_config == config
