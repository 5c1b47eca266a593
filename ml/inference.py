"""SageMaker PyTorch serving functions: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

Request bodies: one image (``image/jpeg``, ``image/png``, ``application/x-image``; any size, EXIF
orientation honoured) or a JSON batch ``{"instances": [{"b64": "<base64 image>"}, ...]}`` (a list of base64
strings is accepted too). One image answers::

    {"count": 3, "confidence": 0.61, "classes": [0, 1, ..., 6], "probabilities": [...],
     "model": "<model id>", "overflow_class": 6}

(``overflow_class`` only when the last class means "that many or more"; whether ``count`` may be that class
is the model's ``answer_overflow``, and ``confidence`` is the probability of the class answered;
``operating_point`` — the thresholds of ``ml.decisions``, ``class_prior``, ``consignment_error_rate`` — only
when the model's config measured one); a batch answers ``{"predictions": [<one per image>]}``. A bad body raises
:class:`BadRequest`, whose ``status_code`` SageMaker's handler and ``ml.serve`` put on the response with the
message: 400 (not a readable photo, too small, blank), 413 (too many bytes or pixels), 415 (a content type or
image format we do not serve), 406 (an Accept without JSON).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ml import decisions
from ml.calibration import calibrated
from ml.data import (
    MAX_IMAGE_PIXELS,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    decode,
    dihedral,
    normalize,
    without_reprs,
)
from ml.model import ModelConfig, for_cpu_serving, load_model

IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_TYPE = "application/json"
MAX_BODY_BYTES = int(os.environ.get("INVMON_MAX_BODY_BYTES", str(8 * 1024 * 1024)))
MAX_BATCH = int(os.environ.get("INVMON_MAX_BATCH", "32"))
# Pixels one request may make us decode, over all its images: decoding costs time and memory in proportion
# (a JSON batch of 32 large PNGs once held the server for 26 s); two of the largest photos allowed.
MAX_REQUEST_PIXELS = int(os.environ.get("INVMON_MAX_REQUEST_PIXELS", str(2 * MAX_IMAGE_PIXELS)))
# A bin photo smaller than this on a side holds nothing the model could count (a 1x1 image was answered "0"
# with confidence).
MIN_IMAGE_SIDE = 32
# The operating point keys an answer carries (the config may hold more: targets, coverage tables): the
# thresholds, the class prior and the error rate they were chosen at, and why a decision is never taken.
OPERATING_POINT_KEYS = (*decisions.THRESHOLD_KEYS, "class_prior", "consignment_error_rate", "not_decided")
# Symmetries averaged at prediction time (1 = none, up to 8); the model config may set its own default.
TTA_ENV = "INVMON_TTA"


try:
    # In the serving container, sagemaker-inference turns this exception type into the response status.
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:  # local use without the toolkit
    _ToolkitError = Exception


class BadRequest(ValueError, _ToolkitError):
    """A request the model cannot answer; ``status_code`` is the HTTP status to return."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        ValueError.__init__(self, message)
        self.status_code = status_code
        self.message = message
        self.phrase = message


@dataclass
class LoadedModel:
    network: torch.nn.Module
    config: ModelConfig
    device: torch.device
    tta: int = 1


@dataclass
class Images:
    tensor: torch.Tensor  # uint8 (N, 3, S, S)
    batch: bool


# The container calls input_fn(body, content_type) without the model; the loaded model's input size is
# kept here (one model per serving process).
_image_size = ModelConfig().image_size


# Set to 1 to serve the plain eager model on CPU (for debugging; the traced one gives the same answers).
EAGER_ENV = "INVMON_EAGER"


def model_fn(model_dir: str) -> LoadedModel:
    global _image_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network, config = load_model(Path(model_dir), device)
    check_config(config)
    if device.type == "cpu" and os.environ.get(EAGER_ENV, "") not in ("1", "true"):
        network = for_cpu_serving(network, config.image_size)
    _image_size = config.image_size
    tta = int(os.environ.get(TTA_ENV, str(config.tta)))
    return LoadedModel(network, config, device, max(1, min(8, tta)))


def check_config(config: ModelConfig) -> None:
    """Refuse, at load, a config whose decisions could not be served: thresholds that are not finite numbers in
    [0, 1] in a consistent order (``ml.decisions.check_operating_point`` names the key), or a temperature that
    is not a positive finite number. Served, such a config answered 200 while the count Lambda refused every
    answer (NaN, infinity, out of range) or failed every request with 500 (strings, lists)."""
    temperature = config.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise decisions.OperatingPointError(f"model-config.json temperature must be a positive finite number, got "
                                            f"{temperature!r}")
    if config.operating_point:
        decisions.check_operating_point(config.operating_point, config.num_classes,
                                        where="model-config.json operating_point")


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


class _PixelBudget:
    """What is left of one request's pixel allowance."""

    def __init__(self) -> None:
        self.left = MAX_REQUEST_PIXELS


def _decode(body: bytes, size: int, budget: _PixelBudget, what: str = "body") -> torch.Tensor:
    if not body:
        raise BadRequest(f"{what} is empty")
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"{what} is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status_code=413)
    try:
        # The header's width x height is checked before any decoding, against this image's share of the budget.
        tensor, pixels = decode(body, size, draft=True, min_side=MIN_IMAGE_SIDE,
                                max_pixels=min(MAX_IMAGE_PIXELS, budget.left))
    except ImageTooLarge as error:
        raise BadRequest(f"{what}: {error}", status_code=413) from None
    except UnsupportedImage as error:
        raise BadRequest(f"{what}: {error}", status_code=415) from None
    except ImageError as error:
        raise BadRequest(f"{what}: {error}") from None
    budget.left -= pixels
    if int(tensor.max()) == int(tensor.min()):
        # One colour everywhere: no bin, no objects; answering "0" here would be a confident guess.
        raise BadRequest(f"{what}: image is blank (a single colour); send a photo of the bin")
    return tensor


def _as_bytes(body: bytes | bytearray | str | object) -> bytes:
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if hasattr(body, "read"):
        return body.read()
    raise BadRequest(f"unsupported body of type {type(body).__name__}")


def public_message(error: BaseException) -> str:
    """An exception as a caller may read it: its type and message, without object reprs."""
    return f"{type(error).__name__}: {without_reprs(str(error))}"


def input_fn(request_body: bytes | str, request_content_type: str | None) -> Images:
    # Exactly two parameters: sagemaker-inference passes its request context as a third one when a
    # handler has room for it.
    size = _image_size
    content_type = _base_type(request_content_type)
    body = _as_bytes(request_body)
    budget = _PixelBudget()
    if content_type in IMAGE_TYPES:
        return Images(_decode(body, size, budget).unsqueeze(0), batch=False)
    if content_type == JSON_TYPE:
        if len(body) > MAX_BODY_BYTES * 2:
            raise BadRequest(f"body is {len(body)} bytes; the limit is {MAX_BODY_BYTES * 2}", status_code=413)
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadRequest(f"body is not valid JSON: {error}") from None
        except RecursionError:
            raise BadRequest("body is not a JSON batch: it nests too deeply") from None
        items = document.get("instances") if isinstance(document, dict) else document
        if not isinstance(items, list) or not items:
            raise BadRequest('a JSON batch is {"instances": [{"b64": "<base64 image>"}, ...]} with at least one image')
        if len(items) > MAX_BATCH:
            raise BadRequest(f"batch holds {len(items)} images; the limit is {MAX_BATCH}", status_code=413)
        tensors = []
        for index, item in enumerate(items):
            encoded = item.get("b64") if isinstance(item, dict) else item
            if not isinstance(encoded, str):
                raise BadRequest(f"instance {index} has no base64 image (expected a string or {{'b64': ...}})")
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as error:
                raise BadRequest(f"instance {index} is not valid base64: {error}") from None
            tensors.append(_decode(raw, size, budget, f"instance {index}"))
        return Images(torch.stack(tensors), batch=True)
    raise BadRequest(
        f"unsupported content type {request_content_type!r}; send one of {', '.join((*IMAGE_TYPES, JSON_TYPE))}",
        status_code=415,
    )


@torch.no_grad()
def predict_fn(input_data: Images, model: LoadedModel) -> dict:
    config = model.config
    batch = normalize(input_data.tensor, config.mean, config.std).to(model.device)
    probabilities = sum(model.network(dihedral(batch, k)).float().softmax(1) for k in range(model.tta)) / model.tta
    if config.temperature != 1.0:
        # The calibrated probabilities (ml/calibration.py): the temperature divides the log of the average.
        probabilities = calibrated(probabilities.clamp_min(1e-8).log(), config.temperature)
    return {"probabilities": probabilities.cpu(), "batch": input_data.batch, "config": config}


def _one(probabilities: torch.Tensor, config: ModelConfig) -> dict:
    confidence, index = config.answer(probabilities)
    answer = {
        "count": int(config.classes[int(index)]),
        "confidence": round(float(confidence), 6),
        "classes": config.classes,
        "probabilities": [round(float(p), 6) for p in probabilities],
        "model": config.model_id or config.model_name,
    }
    if config.overflow:
        answer["overflow_class"] = config.classes[-1]
    point = config.operating_point or {}
    if all(key in point for key in decisions.THRESHOLD_KEYS):
        answer["operating_point"] = {key: point[key] for key in OPERATING_POINT_KEYS if key in point}
    return answer


def accepts_json(accept: str | None) -> bool:
    """Whether an Accept header admits application/json: any listed media range that matches it (the type
    itself, ``application/*`` or ``*/*``) with a non-zero quality, or no header at all."""
    if not accept or not accept.strip():
        return True
    for media_range in accept.split(","):
        kind, *params = (part.strip().lower() for part in media_range.split(";"))
        if kind not in (JSON_TYPE, "application/*", "*/*"):
            continue
        quality = next((p.split("=", 1)[1] for p in params if p.startswith("q=")), "1")
        try:
            if float(quality) > 0:
                return True
        except ValueError:
            continue
    return False


def check_accept(accept: str | None) -> None:
    if not accepts_json(accept):
        raise BadRequest(f"cannot answer in {accept!r}; the model answers application/json", status_code=406)


def output_fn(prediction: dict, accept: str | None = JSON_TYPE) -> tuple[str, str] | str:
    check_accept(accept)
    answers = [_one(p, prediction["config"]) for p in prediction["probabilities"]]
    document = {"predictions": answers} if prediction["batch"] else answers[0]
    return json.dumps(document)
