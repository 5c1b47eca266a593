"""The dataset request an execution may carry at ``$.input.dataset``, validated at the edge.

Every field is optional: ``{}`` means the deployment's defaults (``cdk.json``: datasetSelector, sourceBucket,
splitValidationFraction, splitTestFraction), which the construct hands to the functions as environment
variables. A request that cannot be honoured raises :class:`InvalidDatasetRequest`, whose message names each
wrong field; the state machine does not retry that error, so the execution fails at once with it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from aws_lambda_powertools.utilities.parser import BaseModel, ValidationError, parse
from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

# file-list: the classic 10,441 list; count-range: every listed photo whose count is in [minCount, maxCount];
# challenge: the ABID counting challenge's train, validation or "all" (both, 360,767 photos of 0-5 objects);
# manifest: a user's list; all: every photo whose metadata the source bucket lists (~536,000), any count.
SELECTORS = ("file-list", "count-range", "challenge", "manifest", "all")
CHALLENGE_SPLITS = ("train", "validation", "all")
_S3_URI = re.compile(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(.+)")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


class InvalidDatasetRequest(ValueError):
    """The execution asked for a dataset that cannot be built; the message says which field and why."""


class DatasetRequest(BaseModel):
    """``$.input.dataset``. Field names are camelCase in the request (``minCount``), snake_case here."""

    # strict: "3" is not a count and true is not a limit (JSON gives each its own type).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              strict=True)

    selector: Literal["file-list", "count-range", "challenge", "manifest", "all"] | None = None
    min_count: int | None = Field(default=None, ge=0)
    max_count: int | None = Field(default=None, ge=0)
    challenge_split: Literal["train", "validation", "all"] | None = None
    manifest_uri: str | None = None
    source_bucket: str | None = None
    limit: int | None = Field(default=None, ge=1)
    validation_fraction: float | None = Field(default=None, ge=0.01, le=0.5)
    test_fraction: float | None = Field(default=None, ge=0.0, le=0.5)
    seed: str | int | None = None
    # People's answers from the review loop (raw/reviewed/) join the train split; validation and test stay ABID's.
    # None (not given) means true: the normalized execution input holds only what was given.
    include_reviewed: bool | None = None

    @field_validator("manifest_uri")
    @classmethod
    def _s3_uri(cls, value: str | None) -> str | None:
        if value is not None and not _S3_URI.fullmatch(value):
            raise ValueError("must be an S3 URI such as s3://<bucket>/manifests/my-list.csv")
        return value

    @field_validator("source_bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET.fullmatch(value):
            raise ValueError("must be an S3 bucket name such as aft-vbi-pds")
        return value

    @model_validator(mode="after")
    def _fits_selector(self) -> DatasetRequest:
        selector = self.selector
        if selector is not None and selector != "count-range":
            for name in ("min_count", "max_count"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{to_camel(name)} only applies to selector 'count-range', not {selector!r}")
        if selector not in (None, "challenge") and self.challenge_split is not None:
            raise ValueError(f"challengeSplit only applies to selector 'challenge', not {selector!r}")
        if selector == "manifest" and self.manifest_uri is None:
            raise ValueError("manifestUri is required with selector 'manifest'")
        if selector not in (None, "manifest") and self.manifest_uri is not None:
            raise ValueError(f"manifestUri only applies to selector 'manifest', not {selector!r}")
        if self.min_count is not None and self.max_count is not None and self.min_count > self.max_count:
            raise ValueError(f"minCount ({self.min_count}) must not exceed maxCount ({self.max_count})")
        return self


@dataclass(frozen=True)
class Plan:
    """A request with every default filled in: what the copy and split steps act on."""

    run_id: str
    selector: str
    source_bucket: str
    min_count: int | None
    max_count: int | None
    challenge_split: str | None
    manifest_uri: str | None
    limit: int | None
    validation_fraction: float
    test_fraction: float
    seed: str
    tolerated_failure_percent: float
    include_reviewed: bool | None = True

    def to_dict(self) -> dict[str, Any]:
        return {to_camel(key): value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**{name: data.get(to_camel(name)) for name in cls.__dataclass_fields__})


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(to_camel(str(part)) for part in item["loc"]) or "dataset"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message} (got {item['input']!r})" if item["loc"] else message)
    return "; ".join(problems)


def parse_request(dataset: Any) -> DatasetRequest:
    if dataset is None:
        dataset = {}
    if not isinstance(dataset, dict):
        raise InvalidDatasetRequest(f"invalid dataset request: input.dataset must be an object, got {dataset!r}")
    try:
        return parse(event=dataset, model=DatasetRequest)
    except ValidationError as error:
        raise InvalidDatasetRequest(f"invalid dataset request: {_describe(error)}") from None


# Step Functions execution names are at most 80 characters; a run id keeps that length: the name made safe for an
# S3 key (at most 69 characters), "-", and 10 hex digits of the exact name's SHA-256.
RUN_ID_DIGEST_CHARS = 10


def run_id_from(execution: str | None, now: str) -> str:
    """A run id unique per execution name: the name made safe for an S3 key, plus a digest of the exact name, so
    ``exp-1``, ``exp+1``, ``exp@1`` and ``expü1`` (one safe form, four executions) never share a run's prefixes.
    A manual invocation without a name gets a time stamp."""
    if execution:
        name = execution.rsplit(":", 1)[-1]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name).strip(".-")[:80 - RUN_ID_DIGEST_CHARS - 1].rstrip(".-")
        digest = hashlib.sha256(name.encode()).hexdigest()[:RUN_ID_DIGEST_CHARS]
        return f"{safe or 'run'}-{digest}"
    return f"manual-{now}"


def resolve(request: DatasetRequest, *, run_id: str, environ: dict[str, str] | None = None) -> Plan:
    """Fill the request's gaps from the deployment defaults and check what spans several fields."""
    env = os.environ if environ is None else environ
    selector = request.selector or env.get("DATASET_SELECTOR", "file-list")
    if selector not in SELECTORS:
        raise InvalidDatasetRequest(f"invalid deployment default DATASET_SELECTOR={selector!r}")
    # Fields for another selector than the one in force (the request named none, the default differs).
    misplaced = {
        "minCount": (request.min_count, "count-range"),
        "maxCount": (request.max_count, "count-range"),
        "challengeSplit": (request.challenge_split, "challenge"),
        "manifestUri": (request.manifest_uri, "manifest"),
    }
    for name, (value, wanted) in misplaced.items():
        if value is not None and selector != wanted:
            raise InvalidDatasetRequest(
                f"invalid dataset request: {name} only applies to selector {wanted!r}, and the selector in force "
                f"is {selector!r}"
            )
    if selector == "manifest" and request.manifest_uri is None:
        raise InvalidDatasetRequest(
            "invalid dataset request: manifestUri is required because the default selector is 'manifest'"
        )
    validation = request.validation_fraction
    test = request.test_fraction
    validation = float(env.get("SPLIT_VALIDATION_FRACTION", "0.1")) if validation is None else validation
    test = float(env.get("SPLIT_TEST_FRACTION", "0.1")) if test is None else test
    if validation + test >= 0.9:
        raise InvalidDatasetRequest(
            f"invalid dataset request: validationFraction + testFraction must leave at least 10 % for "
            f"training, got {validation} + {test}"
        )
    deployed_source = env.get("SOURCE_BUCKET", "aft-vbi-pds")
    if request.source_bucket is not None and request.source_bucket != deployed_source:
        # The copy and select roles may read s3://<deployed source>/ only (infra/ingest.py): any other bucket
        # would be accepted here and then fail once per image, late.
        raise InvalidDatasetRequest(
            f"invalid dataset request: sourceBucket {request.source_bucket!r} cannot be read by this stack, which "
            f"was deployed to read {deployed_source!r}; deploy with -c sourceBucket={request.source_bucket} to "
            "ingest from it"
        )
    min_count = max_count = None
    if selector == "count-range":
        # The ABID counting challenge's classes, 0-5, when the request names no bounds.
        min_count = 0 if request.min_count is None else request.min_count
        max_count = 5 if request.max_count is None else request.max_count
        if min_count > max_count:
            raise InvalidDatasetRequest(
                f"invalid dataset request: minCount ({min_count}) must not exceed maxCount ({max_count})"
            )
    return Plan(
        run_id=run_id,
        selector=selector,
        source_bucket=deployed_source,
        min_count=min_count,
        max_count=max_count,
        challenge_split=(request.challenge_split or "train") if selector == "challenge" else None,
        manifest_uri=request.manifest_uri if selector == "manifest" else None,
        limit=request.limit,
        validation_fraction=validation,
        test_fraction=test,
        seed=str(request.seed) if request.seed is not None else "invmon",
        tolerated_failure_percent=float(env.get("INGEST_TOLERATED_FAILURE_PERCENT", "5")),
        include_reviewed=request.include_reviewed is not False,
    )
