from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml.model import (
    LITE_SCALING,
    EfficientNetLite,
    ModelConfig,
    block_specs,
    build_model,
    load_model,
    low_blocks,
    pretrained_weights_path,
    save_model,
)


@pytest.mark.parametrize("model_name", sorted(LITE_SCALING))
def test_self_contained_lite_network_reproduces_the_reference_implementation(model_name: str) -> None:
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    try:
        weights = pretrained_weights_path(model_name)
    except RuntimeError as error:  # only the network the project trains is a dependency
        pytest.skip(str(error))
    torch.manual_seed(0)
    reference = reference_package.EfficientNet.from_pretrained(model_name, weights_path=str(weights)).eval()
    ours = EfficientNetLite(num_classes=1000, model_name=model_name)
    ours.load_state_dict(torch.load(weights, weights_only=True))
    ours.eval()
    # The reference pads for its native size only (224, 240, 260); ours pads for whatever size comes.
    size = reference._global_params.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(reference(x), ours(x), atol=1e-4)


@pytest.mark.parametrize("model_name", sorted(LITE_SCALING))
def test_the_default_frozen_blocks_are_those_below_stride_16(model_name: str) -> None:
    stride, below = 2, 0  # the stem halves the photo
    for _kernel, block_stride, *_ in block_specs(model_name):
        stride *= block_stride
        if stride >= 16:
            break
        below += 1
    assert low_blocks(model_name) == below
    assert build_model(7, pretrained=False, freeze_blocks=below, model_name=model_name)._blocks[below - 1] \
        ._project_conv.weight.requires_grad is False


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
