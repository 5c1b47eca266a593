"""The seed's design, rebuilt as the yardstick: torchvision ResNet-101 with a 5-class head, fp32, eager,
PIL decoding + torchvision transforms (Resize 224, ToTensor, Normalize), batch size 32.

ImageNet weights for ResNet-101 cannot be fetched offline, so the network is ``resnet101(weights=None)``:
speed does not depend on the values of the weights, but accuracy does, so no accuracy is claimed for it.
Its serving functions answer the same JSON contract as ``ml.inference`` so that both paths do the same work.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import models, transforms

NUM_CLASSES = 5  # the seed counted 1..5
CLASSES = [1, 2, 3, 4, 5]
BATCH_SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

TRANSFORM = transforms.Compose([transforms.Resize(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def build_network() -> nn.Module:
    network = models.resnet101(weights=None)
    network.fc = nn.Linear(network.fc.in_features, NUM_CLASSES)
    return network


@dataclass
class SeedModel:
    network: nn.Module
    device: torch.device


@dataclass
class SeedImages:
    tensor: torch.Tensor
    batch: bool


def model_fn(model_dir: str | None = None) -> SeedModel:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    return SeedModel(build_network().to(device).eval(), device)


def _decode(body: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(body)) as image:
        return TRANSFORM(image.convert("RGB"))


def input_fn(body: bytes, content_type: str) -> SeedImages:
    if content_type == "application/json":
        items = json.loads(body)["instances"]
        return SeedImages(torch.stack([_decode(base64.b64decode(item["b64"])) for item in items]), batch=True)
    return SeedImages(_decode(body).unsqueeze(0), batch=False)


@torch.no_grad()
def predict_fn(data: SeedImages, model: SeedModel) -> dict:
    probabilities = model.network(data.tensor.to(model.device)).softmax(1).cpu()
    return {"probabilities": probabilities, "batch": data.batch}


def output_fn(prediction: dict, accept: str | None = "application/json") -> str:
    answers = []
    for p in prediction["probabilities"]:
        confidence, index = p.max(0)
        answers.append({"count": CLASSES[int(index)], "confidence": round(float(confidence), 6), "classes": CLASSES,
                        "probabilities": [round(float(x), 6) for x in p], "model": "seed-resnet101"})
    return json.dumps({"predictions": answers} if prediction["batch"] else answers[0])


# --- training: the seed decoded every photo with PIL at every step through a DataLoader -----------------------


class PhotoDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], quantities: list[int]) -> None:
        self.files, self.quantities = files, quantities

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            tensor = TRANSFORM(image.convert("RGB"))
        return tensor, max(0, min(NUM_CLASSES - 1, self.quantities[index] - 1))


def loader(files: list[Path], quantities: list[int], workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PhotoDataset(files, quantities), batch_size=BATCH_SIZE, shuffle=True,
                                       num_workers=workers, drop_last=True)


def training_parts() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    network = build_network()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return network, optimizer
