"""What a counted photo becomes: the checks before the endpoint sees it, and the table record after.

Shared by the count Lambda (one photo per S3 event) and the bulk loader (one photo per Batch Transform
output), so a photo gets the same record whichever path counted it. The standard library, plus the
Powertools parser (pydantic) model that holds the endpoint's answers to the serving contract.

Table design (one table, single-table style; every item has ``pk`` and ``sk``)::

    count record      pk = "photo#<object key>"        sk = "version#<versionId or 'null'>"
                      status, count, confidence, classes, probabilities, model, countedAt, expectedCount,
                      expectedFrom, reason, rejectReason, bucket, key, versionId, size, source, notes,
                      decidedBy ("model": the answering model's operating point; "config": the stack's
                      threshold), thresholds (the ones applied), discrepancyProbability (the posterior that
                      the consignment is wrong, ml.decisions; on every record with a prediction and an
                      expected count)
    consignment       pk = "consignment#<object key>"  sk = "consignment"      expectedCount
                      pk = "consignment#bin#<bin id>"  sk = "consignment"      expectedCount

The bin id is the photo's file name without extension (ABID names a photo after its bin image id), so a
consignment can be announced before anyone knows the exact key of the photo. A photo's count records are
one partition, newest version last; the ``byStatus`` index (``status``, ``countedAt``) lists every mismatch
or rejection in time order without a scan.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Annotated, Any

from aws_lambda_powertools.utilities.parser import ValidationError, parse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from ml import decisions

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


# A bin holds at most a few hundred items; anything far beyond is a typo or an attack, and DynamoDB numbers
# hold 38 digits at most, so an unbounded value could fail the write and turn a photo into a poison message.
MAX_EXPECTED_COUNT = 1_000_000
# ASCII digits only: str.isdigit() also accepts "²" and "①" (which int() then refuses) and int() reads "٣" and
# "３" as 3, so a count nobody typed on purpose would be compared with the model's.
_ASCII_COUNT = re.compile(r"[0-9]{1,7}")


def parse_expected(value: Any) -> int | None:
    """An expected count from metadata or a consignment item; None when absent or not a sane count."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        number = int(value)
    elif isinstance(value, str) and _ASCII_COUNT.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        return None
    return number if 0 <= number <= MAX_EXPECTED_COUNT else None


def _shown(value: Any) -> str:
    # Short enough for a DynamoDB item and a log line whatever a sender put there.
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def expected_from_metadata(metadata: Mapping[str, str]) -> tuple[int | None, str | None]:
    """(expected count, problem): a present but unreadable value is reported, not silently dropped."""
    raw = {k.lower(): v for k, v in metadata.items()}.get(EXPECTED_COUNT_METADATA)
    if raw is None:
        return None, None
    expected = parse_expected(raw)
    if expected is None:
        return None, (f"x-amz-meta-{EXPECTED_COUNT_METADATA} is not a count (ASCII digits, 0 to "
                      f"{MAX_EXPECTED_COUNT}): {_shown(raw)}")
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
            notes.append(f"consignment {item_key['pk']} has no usable expectedCount (ASCII digits, 0 to "
                         f"{MAX_EXPECTED_COUNT}): {_shown(item.get('expectedCount'))}")
    return None, None, notes


class BadPrediction(ValueError):
    """An endpoint answer outside the response contract; a bug or version skew, never the photo's fault."""


Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class OperatingPoint(BaseModel):
    """The decision thresholds measured for the answering model (``ModelConfig.operating_point``): the posterior
    rule of ``ml.decisions`` (thresholds on the discrepancy probability, ``null`` with a reason for a decision the
    model never takes, its class prior and the error rate they were chosen at), or a model's from before it
    (thresholds on the probability of the expected count)."""

    model_config = ConfigDict(extra="ignore")

    count_threshold: Probability | None = None
    match_max_discrepancy: Probability | None = None
    mismatch_min_discrepancy: Probability | None = None
    class_prior: list[Probability] | None = None
    consignment_error_rate: Probability | None = None
    not_decided: dict[str, str] | None = None
    match_threshold: Probability | None = None
    mismatch_threshold: Probability | None = None

    @property
    def posterior_rule(self) -> bool:
        return self.match_threshold is None and self.mismatch_threshold is None

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and ("match_threshold" in data or "mismatch_threshold" in data):
            for key in ("count_threshold", "match_threshold", "mismatch_threshold"):
                if data.get(key) is None:
                    raise ValueError(f"operating_point.{key} is missing")
            return data
        # The same check as the model's load (ml/inference.py model_fn): one source of truth.
        decisions.check_operating_point(data)
        return data


class Prediction(BaseModel):
    """One answer of the serving contract (``ml/inference.py``): anything else is a fault of the endpoint."""

    model_config = ConfigDict(extra="ignore")

    count: Annotated[StrictInt, Field(ge=0)]
    confidence: Probability
    classes: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
    probabilities: list[Probability]
    model: StrictStr
    overflow_class: StrictInt | None = None
    operating_point: OperatingPoint | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Prediction:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes repeat a class")
        if len(self.probabilities) != len(self.classes):
            raise ValueError(f"{len(self.probabilities)} probabilities for {len(self.classes)} classes")
        if self.count not in self.classes:
            raise ValueError(f"count {self.count} is not among the classes")
        if self.overflow_class is not None and self.overflow_class not in self.classes:
            raise ValueError(f"overflow_class {self.overflow_class} is not among the classes")
        return self


def read_prediction(answer: Any) -> dict[str, Any]:
    """Check one prediction against the serving contract (a Powertools parser model) and normalise it."""
    try:
        checked = parse(event=answer, model=Prediction)
    except (ValidationError, ValueError, TypeError) as error:
        raise BadPrediction(f"prediction does not follow the response contract: {error}") from None
    return checked.model_dump(exclude_none=True)


def read_answer(body: bytes) -> dict[str, Any]:
    """The endpoint's raw answer to one photo (``ml/inference.py`` output_fn: one prediction, or a batch of one),
    checked by ``read_prediction``; the count Lambda and the deploy's smoke check read answers with it."""
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadPrediction(f"the endpoint's answer is not JSON: {error}") from None
    if isinstance(answer, dict) and isinstance(answer.get("predictions"), list) and answer["predictions"]:
        answer = answer["predictions"][0]
    return read_prediction(answer)


@dataclass(frozen=True)
class Decision:
    """A record's status, which rule set it (``model``: the answer's operating point; ``config``: the stack's
    single threshold), the thresholds that rule used, why a count was not trusted, and the posterior probability
    that the consignment is wrong (``ml.decisions``; None without an expected count)."""

    status: str
    decided_by: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    discrepancy: float | None = None


def parse_error_rate(text: str | None) -> float:
    """The ``CONSIGNMENT_ERROR_RATE`` setting (the stack's ``consignmentErrorRate``); the default when unset."""
    if text is None or not text.strip():
        return decisions.DEFAULT_ERROR_RATE
    try:
        value = float(text)
    except ValueError:
        value = text  # type: ignore[assignment]
    return decisions.check_rate(value, "CONSIGNMENT_ERROR_RATE")


def discrepancy_probability(prediction: Mapping[str, Any], expected: int, rate: float) -> float:
    """The posterior that the consignment is wrong, from the answer's calibrated probabilities and the class
    prior its operating point carries (uniform for a model that carries none)."""
    point = prediction.get("operating_point") or {}
    return decisions.for_answer(prediction["classes"], prediction["probabilities"], prediction.get("overflow_class"),
                                expected, point.get("class_prior"), rate)


MODEL_RULE = "model"
CONFIG_RULE = "config"
# What "countConfidenceThreshold": "model" falls back to for an answer with no operating point (a model
# trained before operating points existed): the single threshold used before them.
DEFAULT_THRESHOLD = 0.5


def parse_threshold(text: str | None) -> float | None:
    """The ``CONFIDENCE_THRESHOLD`` setting: None for "model" (each answer's operating point), else a number."""
    if text is None or text.strip().lower() == MODEL_RULE:
        return None
    number = float(text)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"CONFIDENCE_THRESHOLD must be 'model' or a number in [0, 1], got {text!r}")
    return number


def _likelihood(prediction: Mapping[str, Any], expected: int) -> float:
    """The probability the model gives the expected count: its class, or the overflow class ("this many or
    more") when the expected count is at or above it; 0 for a count the model cannot answer."""
    likelihood = dict(zip(prediction["classes"], prediction["probabilities"], strict=True))
    overflow = prediction.get("overflow_class")
    if overflow is not None and expected >= overflow:
        return likelihood[overflow]
    return likelihood.get(expected, 0.0)


def _by_operating_point(prediction: Mapping[str, Any], expected: int | None, point: Mapping[str, float]) -> Decision:
    thresholds = {name: float(point[name]) for name in ("count_threshold", "match_threshold", "mismatch_threshold")}
    if expected is None:
        if prediction["confidence"] >= thresholds["count_threshold"]:
            return Decision(COUNTED, MODEL_RULE, thresholds)
        return Decision(LOW_CONFIDENCE, MODEL_RULE, thresholds,
                        f"confidence {prediction['confidence']:.3f} is below the model's count threshold "
                        f"{thresholds['count_threshold']:.3f}")
    p = _likelihood(prediction, expected)
    if p >= thresholds["match_threshold"]:
        return Decision(MATCH, MODEL_RULE, thresholds)
    if p <= thresholds["mismatch_threshold"]:
        return Decision(MISMATCH, MODEL_RULE, thresholds)
    return Decision(LOW_CONFIDENCE, MODEL_RULE, thresholds,
                    f"probability {p:.3f} of the expected count {expected} lies between the model's mismatch "
                    f"({thresholds['mismatch_threshold']:.3f}) and match ({thresholds['match_threshold']:.3f}) "
                    "thresholds")


def _by_posterior(prediction: Mapping[str, Any], expected: int | None, point: Mapping[str, Any],
                  rate: float) -> Decision:
    thresholds = {name: float(point[name]) for name in decisions.THRESHOLD_KEYS if point.get(name) is not None}
    never = point.get("not_decided") or {}
    if expected is None:
        if decisions.COUNT_KEY not in thresholds:
            return Decision(LOW_CONFIDENCE, MODEL_RULE, thresholds,
                            f"the model never counts without an expected count: {never.get(decisions.COUNT_KEY)}")
        if prediction["confidence"] >= thresholds[decisions.COUNT_KEY]:
            return Decision(COUNTED, MODEL_RULE, thresholds)
        return Decision(LOW_CONFIDENCE, MODEL_RULE, thresholds,
                        f"confidence {prediction['confidence']:.3f} is below the model's count threshold "
                        f"{thresholds[decisions.COUNT_KEY]:.3f}")
    q = discrepancy_probability(prediction, expected, rate)
    status = decisions.decide(q, point)
    if status is not None:
        return Decision(status, MODEL_RULE, thresholds, discrepancy=q)
    bounds = [f"{name} {thresholds[key]:.3f}" if key in thresholds else f"no {name} ({never.get(key)})"
              for key, name in ((decisions.MATCH_KEY, "match below"), (decisions.MISMATCH_KEY, "mismatch above"))]
    return Decision(LOW_CONFIDENCE, MODEL_RULE, thresholds,
                    f"probability {q:.3f} that the consignment of {expected} is wrong (error rate {rate:g}) is "
                    f"not decided by the model's thresholds: {'; '.join(bounds)}", discrepancy=q)


def _by_threshold(prediction: Mapping[str, Any], expected: int | None, threshold: float) -> Decision:
    decided = {"threshold": threshold}
    low = Decision(LOW_CONFIDENCE, CONFIG_RULE, decided,
                   f"confidence {prediction['confidence']:.3f} is below the {threshold} threshold")
    overflow = prediction.get("overflow_class")
    if expected is not None and overflow is not None and expected >= overflow:
        # The overflow class means "this many or more" and the model counts exactly only below it (a model may
        # answer the best exact count instead): a bin that should hold that many agrees when the overflow
        # class is the most likely one.
        likelihood = dict(zip(prediction["classes"], prediction["probabilities"], strict=True))
        if likelihood[overflow] >= max(likelihood.values()):
            return Decision(MATCH, CONFIG_RULE, decided) if likelihood[overflow] >= threshold else low
    if prediction["confidence"] < threshold:
        return low
    if expected is None:
        return Decision(COUNTED, CONFIG_RULE, decided)
    return Decision(MATCH if prediction["count"] == expected else MISMATCH, CONFIG_RULE, decided)


def decide(
    prediction: Mapping[str, Any] | None,
    rejection: Rejection | None,
    expected: int | None,
    threshold: float | None,
    error_rate: float = decisions.DEFAULT_ERROR_RATE,
) -> Decision:
    """The record's status. ``threshold`` None applies the answer's operating point (``DEFAULT_THRESHOLD``
    with the single-threshold rule when the answer has none); a number overrides with that rule. Whatever the
    rule, a photo with an expected count gets the posterior that its consignment is wrong at ``error_rate``."""
    if rejection is not None or prediction is None:
        return Decision(REJECTED)
    point = prediction.get("operating_point")
    if threshold is None and point and "match_threshold" not in point:
        return _by_posterior(prediction, expected, point, error_rate)
    if threshold is None and point:
        decision = _by_operating_point(prediction, expected, point)
    else:
        decision = _by_threshold(prediction, expected, DEFAULT_THRESHOLD if threshold is None else threshold)
    if expected is None:
        return decision
    return replace(decision, discrepancy=discrepancy_probability(prediction, expected, error_rate))


def decide_status(
    prediction: Mapping[str, Any] | None,
    rejection: Rejection | None,
    expected: int | None,
    threshold: float | None,
) -> str:
    return decide(prediction, rejection, expected, threshold).status


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
    threshold: float | None,
    counted_at: str,
    source: str,
    notes: list[str] | None = None,
    error_rate: float = decisions.DEFAULT_ERROR_RATE,
) -> dict[str, Any]:
    """The table item for one photo (DynamoDB-ready: numbers as Decimal, no None values)."""
    decision = decide(prediction, rejection, expected, threshold, error_rate)
    item: dict[str, Any] = {
        "pk": photo_pk(key),
        "sk": version_sk(version_id),
        "bucket": bucket,
        "key": key,
        "versionId": version_id or "null",
        "size": size,
        "status": decision.status,
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
    if decision.discrepancy is not None:
        # The review queue's order (CONTRACTS.md): most likely wrong first.
        item["discrepancyProbability"] = _decimal(decision.discrepancy)
    if decision.decided_by:
        item["decidedBy"] = decision.decided_by
        item["thresholds"] = {name: _decimal(value) for name, value in decision.thresholds.items()}
    if rejection is not None:
        item["rejectReason"] = rejection.code
        item["reason"] = rejection.reason
    elif decision.reason:
        item["reason"] = decision.reason
    if notes:
        item["notes"] = list(notes)
    return item


def summary(item: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe digest of a record: what the Lambda logs, returns and publishes."""
    out: dict[str, Any] = {}
    for name in ("bucket", "key", "versionId", "status", "count", "expectedCount", "expectedFrom",
                 "confidence", "model", "rejectReason", "reason", "countedAt", "overflowClass", "decidedBy",
                 "discrepancyProbability"):
        if name in item:
            value = item[name]
            out[name] = float(value) if isinstance(value, Decimal) else value
    return out


# --- writing a record without losing a newer one ---------------------------------------------------------

# Statuses a person sets (the review loop): no count, redelivered or not, overwrites them.
PERSON_STATUSES = ("reviewed",)
# S3's sequencer orders the events of one key: "first left pad the shorter value with zeros, and then do a
# lexicographical comparison" (S3 User Guide, "Event message structure"); DynamoDB compares strings by bytes.
_SEQUENCER_WIDTH = 64


def event_order(sequencer: str | None) -> str | None:
    """The S3 event's sequencer, left-padded so that string order is event order (None when absent)."""
    return sequencer.upper().rjust(_SEQUENCER_WIDTH, "0") if sequencer else None


def conditional_put(item: dict[str, Any], sequencer: str | None) -> dict[str, Any]:
    """put_item arguments that write ``item`` only over no record, or over one that a person did not decide and
    that an older S3 event wrote. A redelivered event (SQS after the idempotency window, S3's own duplicates)
    and an older event arriving late keep the record that stands; a record without an event order (the bulk
    loader's) is kept too."""
    order = event_order(sequencer)
    values: dict[str, Any] = {f":person{i}": status for i, status in enumerate(PERSON_STATUSES)}
    not_person = " AND ".join(f"#status <> :person{i}" for i in range(len(PERSON_STATUSES)))
    if order is None:
        condition = "attribute_not_exists(pk)"
        values = {}
    else:
        item = item | {"eventOrder": order}
        values[":order"] = order
        condition = f"attribute_not_exists(pk) OR ({not_person} AND eventOrder < :order)"
    arguments: dict[str, Any] = {"Item": item, "ConditionExpression": condition}
    if values:
        arguments |= {"ExpressionAttributeNames": {"#status": "status"}, "ExpressionAttributeValues": values}
    return arguments
