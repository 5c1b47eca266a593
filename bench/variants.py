"""Ways to run our served model faster, prototyped here before any of them goes into ``ml/inference.py``.

Every variant is a different ``model_fn``: it returns the same :class:`ml.inference.LoadedModel` with another
network in it, so ``input_fn``/``predict_fn``/``output_fn`` stay exactly what is served, and adopting a variant
means changing ``model_fn`` alone. Variant names are ``+``-joined steps applied in this order:

- ``static``: the TensorFlow "SAME" padding computed once for the served image size (a plain ``Conv2d`` with
  symmetric padding where it is symmetric, an explicit ``ZeroPad2d`` only on the stride-2 convolutions) instead
  of per call from the input shape; needed by FX quantization, which cannot trace ``math.ceil`` on a shape;
- ``cl``: channels-last (NHWC) weights and input, the layout oneDNN's depthwise and 1x1 kernels prefer;
- ``int8``: post-training static quantization (FX graph mode, x86 backend: per-channel int8 weights, uint8
  activations) calibrated on training photos, never on the held-out ones;
- ``jit``: ``torch.jit.trace`` + ``torch.jit.freeze`` (folds BatchNorm into the convolutions, constant weights);
- ``compile``: ``torch.compile`` (Inductor: generated C++ kernels; compiled on first call);
- ``tta8`` (or ``tta2`` .. ``tta7``): ``predict_fn`` averages the class probabilities over that many of the 8
  symmetries of the square (``model-config.json``'s ``tta``), whatever the model's config says; every other
  variant serves with the config's own ``tta``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from ml import data as mldata
from ml import inference
from ml.model import ChannelsLast, with_fixed_padding

STEPS = ("static", "cl", "int8", "jit", "compile")
TTA_STEPS = tuple(f"tta{n}" for n in range(1, 9))


def calibration_batch(model: inference.LoadedModel, folder: Path, count: int) -> torch.Tensor:
    config = model.config
    files = sorted((Path(folder) / "bin-images").glob("*.jpg"))[:count]
    images = torch.stack([mldata.decode_image(f, config.image_size) for f in files])
    return mldata.normalize(images, config.mean, config.std)


def quantize_int8(network: nn.Module, calibration: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(network, get_default_qconfig_mapping("x86"), example_inputs=(calibration[:1],))
    with torch.no_grad():
        for start in range(0, len(calibration), 16):
            prepared(calibration[start : start + 16])
    return convert_fx(prepared)


def load(model_dir: str | Path, variant: str = "eager", calibration_dir: str | Path | None = None,
         calibration_images: int = 64) -> tuple[inference.LoadedModel, dict]:
    """``ml.inference.model_fn`` plus the variant's steps; returns the model and the seconds each step took."""
    steps = [] if variant in ("", "eager") else variant.split("+")
    unknown = [s for s in steps if s not in STEPS + TTA_STEPS]
    if unknown:
        raise ValueError(f"unknown variant steps {unknown}; known: {STEPS} and tta1..tta8")
    tta = [int(s[3:]) for s in steps if s in TTA_STEPS]
    timings: dict[str, float] = {}
    started = time.perf_counter()
    # Variants are built on the eager model; model_fn alone now serves the fast path (static+cl+jit) on CPU.
    saved = os.environ.get(inference.EAGER_ENV)
    os.environ[inference.EAGER_ENV] = "1"
    try:
        model = inference.model_fn(str(model_dir))
    finally:
        if saved is None:
            os.environ.pop(inference.EAGER_ENV, None)
        else:
            os.environ[inference.EAGER_ENV] = saved
    timings["model_fn_s"] = time.perf_counter() - started
    size = model.config.image_size
    network = model.network.cpu().eval()
    example = torch.zeros(1, 3, size, size)
    if "static" in steps or "int8" in steps:
        network = with_fixed_padding(network, size)
    if "int8" in steps:
        started = time.perf_counter()
        if calibration_dir is None:
            raise ValueError("int8 needs calibration photos (calibration_dir)")
        network = quantize_int8(network, calibration_batch(model, Path(calibration_dir), calibration_images))
        timings["int8_s"] = time.perf_counter() - started
    if "cl" in steps:
        network = ChannelsLast(network.to(memory_format=torch.channels_last))
    if "jit" in steps:
        started = time.perf_counter()
        with torch.no_grad():
            traced = torch.jit.trace(network, example, check_trace=False)
            network = torch.jit.freeze(traced.eval())
            for _ in range(2):  # the profiling executor specialises on the first calls
                network(example)
        timings["jit_s"] = time.perf_counter() - started
    if "compile" in steps:
        started = time.perf_counter()
        network = torch.compile(network)
        with torch.no_grad():
            network(example)
        timings["compile_s"] = time.perf_counter() - started
    model.network = network
    if tta:
        model.tta = tta[-1]
    return model, {k: round(v, 3) for k, v in timings.items()}
