"""What a counted photo becomes: the checks before the endpoint sees it, and the table record after.

Pure standard library, shared by the count Lambda (one photo per S3 event) and the bulk loader (one photo
per Batch Transform output), so a photo gets the same record whichever path counted it.

Table design (one table, single-table style; every item has ``pk`` and ``sk``)::

    count record      pk = "photo#<object key>"        sk = "version#<versionId or 'null'>"
                      status, count, confidence, classes, probabilities, model, countedAt, expectedCount,
                      expectedFrom, reason, rejectReason, bucket, key, versionId, size, source
    consignment       pk = "consignment#<object key>"  sk = "consignment"      expectedCount
                      pk = "consignment#bin#<bin id>"  sk = "consignment"      expectedCount

The bin id is the photo's file name without extension (ABID names a photo after its bin image id), so a
consignment can be announced before anyone knows the exact key of the photo. A photo's count records are
one partition, newest version last; the ``byStatus`` index (``status``, ``countedAt``) lists every mismatch
or rejection in time order without a scan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

# Statuses a count record can have. "counted" is a confident count with nothing to compare it with.
MATCH = "match"
MISMATCH = "mismatch"
LOW_CONFIDENCE = "uncounted-low-confidence"
REJECTED = "rejected"
COUNTED = "counted"
STATUSES = (MATCH, MISMATCH, LOW_CONFIDENCE, REJECTED, COUNTED)
# Statuses a team wants to hear about.
NOTIFY_STATUSES = (MISMATCH, LOW_CONFIDENCE)

# Rejection codes: the machine-readable half of a rejection (the other half is the human reason).
EMPTY = "empty"
TOO_LARGE = "too-large"
UNSUPPORTED_TYPE = "unsupported-type"
NOT_AN_IMAGE = "not-an-image"
CORRUPT = "corrupt"
MISSING = "missing"

EXPECTED_COUNT_METADATA = "expected-count"  # x-amz-meta-expected-count; boto3 lower-cases metadata keys
CONSIGNMENT_SK = "consignment"

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
# Recognised formats the model does not take: named so the record says what the upload was.
_OTHER_FORMATS: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF-", 0, "PDF document"),
    (b"GIF87a", 0, "GIF image"),
    (b"GIF89a", 0, "GIF image"),
    (b"WEBP", 8, "WebP image"),
    (b"II*\x00", 0, "TIFF image"),
    (b"MM\x00*", 0, "TIFF image"),
    (b"BM", 0, "BMP image"),
    (b"ftypheic", 4, "HEIC image"),
    (b"ftypheix", 4, "HEIC image"),
    (b"ftypmif1", 4, "HEIF image"),
    (b"ftypavif", 4, "AVIF image"),
    (b"PK\x03\x04", 0, "ZIP archive"),
    (b"\x1f\x8b", 0, "gzip archive"),
)
# Enough bytes to recognise every format above.
SNIFF_BYTES = 16


@dataclass(frozen=True)
class Rejection:
    code: str
    reason: str


def photo_pk(key: str) -> str:
    return f"photo#{key}"


def version_sk(version_id: str | None) -> str:
    return f"version#{version_id or 'null'}"


def consignment_keys(key: str) -> list[dict[str, str]]:
    """The consignment items that may hold a photo's expected count, most specific first."""
    bin_id = key.rsplit("/", 1)[-1].split(".", 1)[0]
    return [
        {"pk": f"consignment#{key}", "sk": CONSIGNMENT_SK},
        {"pk": f"consignment#bin#{bin_id}", "sk": CONSIGNMENT_SK},
    ]


def content_type(head: bytes) -> str | None:
    """The content type to send the endpoint for an image the model takes, from its magic bytes."""
    if head.startswith(_JPEG):
        return "image/jpeg"
    if head.startswith(_PNG):
        return "image/png"
    return None


def check_upload(size: int, head: bytes, max_bytes: int) -> Rejection | None:
    """Reject what the endpoint need not see: empty, too large, or not a JPEG/PNG by its magic bytes.

    A JPEG whose body is corrupt passes here; the endpoint's decoder is the judge of that (Pillow is not in
    the Lambda runtime, and a second decoder here could disagree with the model's).
    """
    if size == 0:
        return Rejection(EMPTY, "empty object (0 bytes)")
    if size > max_bytes:
        return Rejection(TOO_LARGE, f"object is {size} bytes, more than the {max_bytes}-byte limit")
    if content_type(head) is not None:
        return None
    for magic, offset, name in _OTHER_FORMATS:
        if head[offset : offset + len(magic)] == magic:
            return Rejection(UNSUPPORTED_TYPE, f"unsupported type: {name}; only JPEG and PNG photos are counted")
    return Rejection(NOT_AN_IMAGE, "not an image: the bytes are neither JPEG nor PNG")


def parse_expected(value: Any) -> int | None:
    """An expected count from metadata or a consignment item; None when absent or not a count."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, Decimal | int) and value == int(value) and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def expected_from_metadata(metadata: Mapping[str, str]) -> tuple[int | None, str | None]:
    """(expected count, problem): a present but unreadable value is reported, not silently dropped."""
    raw = {k.lower(): v for k, v in metadata.items()}.get(EXPECTED_COUNT_METADATA)
    if raw is None:
        return None, None
    expected = parse_expected(raw)
    if expected is None:
        return None, f"x-amz-meta-{EXPECTED_COUNT_METADATA} is not a non-negative integer: {raw!r}"
    return expected, None


def expected_count(
    key: str, metadata: Mapping[str, str], get_item: Callable[[dict[str, str]], Mapping[str, Any] | None]
) -> tuple[int | None, str | None, list[str]]:
    """(expected count, where it came from, notes): the object's metadata first, then the consignment items
    (``get_item`` reads one table item by key, or returns None)."""
    expected, problem = expected_from_metadata(metadata)
    notes = [problem] if problem else []
    if expected is not None:
        return expected, "metadata", notes
    for item_key in consignment_keys(key):
        item = get_item(item_key)
        if item is not None:
            value = parse_expected(item.get("expectedCount"))
            if value is not None:
                return value, item_key["pk"], notes
            notes.append(f"consignment {item_key['pk']} has no usable expectedCount")
    return None, None, notes


class BadPrediction(ValueError):
    """An endpoint answer outside the response contract; a bug or version skew, never the photo's fault."""


def read_prediction(answer: Mapping[str, Any]) -> dict[str, Any]:
    """Check one prediction against the serving contract and normalise its types."""
    try:
        count = answer["count"]
        confidence = float(answer["confidence"])
        classes = [int(c) for c in answer["classes"]]
        probabilities = [float(p) for p in answer["probabilities"]]
        model = str(answer["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise BadPrediction(f"prediction does not follow the response contract: {error!r}") from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise BadPrediction(f"prediction count is not a non-negative integer: {count!r}")
    if len(classes) != len(probabilities) or not all(math.isfinite(p) for p in [*probabilities, confidence]):
        raise BadPrediction("prediction classes and probabilities do not pair up, or hold non-finite numbers")
    prediction = {
        "count": count,
        "confidence": confidence,
        "classes": classes,
        "probabilities": probabilities,
        "model": model,
    }
    if answer.get("overflow_class") is not None:
        prediction["overflow_class"] = int(answer["overflow_class"])
    return prediction


def decide_status(
    prediction: Mapping[str, Any] | None,
    rejection: Rejection | None,
    expected: int | None,
    threshold: float,
) -> str:
    if rejection is not None or prediction is None:
        return REJECTED
    overflow = prediction.get("overflow_class")
    if expected is not None and overflow is not None and expected >= overflow:
        # The overflow class means "this many or more" and the model counts exactly only below it (a model may
        # answer the best exact count instead): a bin that should hold that many agrees when the overflow
        # class is the most likely one.
        likelihood = dict(zip(prediction["classes"], prediction["probabilities"], strict=True))
        if likelihood[overflow] >= max(likelihood.values()):
            return MATCH if likelihood[overflow] >= threshold else LOW_CONFIDENCE
    if prediction["confidence"] < threshold:
        return LOW_CONFIDENCE
    if expected is None:
        return COUNTED
    return MATCH if prediction["count"] == expected else MISMATCH


def _decimal(value: float) -> Decimal:
    # DynamoDB numbers are decimals; six places keep probabilities exact enough and items small.
    return Decimal(str(round(value, 6)))


def build_record(
    *,
    bucket: str,
    key: str,
    version_id: str | None,
    size: int,
    prediction: Mapping[str, Any] | None,
    rejection: Rejection | None,
    expected: int | None,
    expected_from: str | None,
    threshold: float,
    counted_at: str,
    source: str,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The table item for one photo (DynamoDB-ready: numbers as Decimal, no None values)."""
    status = decide_status(prediction, rejection, expected, threshold)
    item: dict[str, Any] = {
        "pk": photo_pk(key),
        "sk": version_sk(version_id),
        "bucket": bucket,
        "key": key,
        "versionId": version_id or "null",
        "size": size,
        "status": status,
        "countedAt": counted_at,
        "source": source,
    }
    if expected is not None:
        item["expectedCount"] = expected
        item["expectedFrom"] = expected_from or "unknown"
    if prediction is not None:
        item.update(
            count=prediction["count"],
            confidence=_decimal(prediction["confidence"]),
            classes=list(prediction["classes"]),
            probabilities=[_decimal(p) for p in prediction["probabilities"]],
            model=prediction["model"],
        )
        if "overflow_class" in prediction:
            item["overflowClass"] = prediction["overflow_class"]
    if rejection is not None:
        item["rejectReason"] = rejection.code
        item["reason"] = rejection.reason
    elif status == LOW_CONFIDENCE:
        item["reason"] = f"confidence {prediction['confidence']:.3f} is below the {threshold} threshold"
    if notes:
        item["notes"] = list(notes)
    return item


def summary(item: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe digest of a record: what the Lambda logs, returns and publishes."""
    out: dict[str, Any] = {}
    for name in ("bucket", "key", "versionId", "status", "count", "expectedCount", "expectedFrom",
                 "confidence", "model", "rejectReason", "reason", "countedAt", "overflowClass"):
        if name in item:
            value = item[name]
            out[name] = float(value) if isinstance(value, Decimal) else value
    return out
