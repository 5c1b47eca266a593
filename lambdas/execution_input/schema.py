"""The one schema of the pipeline's execution input, composed from each stage's own request model.

``ExecutionInput`` is ``{"dataset": DatasetRequest, "training": TrainingInput, "deploy": DeployOptions}``, every
section optional, strict (``"3"`` is not a number, ``true`` is not a count) and closed (an unknown key at any level
is refused, with the nearest known key as a did-you-mean). The stages read their section with the very model
that checked it here, so the door and the stages cannot disagree; the same models generate
docs/execution-input.md (lambdas/execution_input/docs.py).

:func:`check` is what the pipeline's first state runs: the schema, then each stage's own cross-field checks
against the deployment's defaults (dataset: lambdas/ingest/request.resolve; training:
lambdas/training/request.resolve), then the stack's allowances (:class:`Allowances`, the controls no input can
switch off). It returns the normalized input, the only form of the input the later states see.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic.alias_generators import to_camel

from lambdas.deploy.options import DeployOptions
from lambdas.ingest.request import DatasetRequest, InvalidDatasetRequest
from lambdas.ingest.request import resolve as resolve_dataset
from lambdas.training.request import Deployment, TrainingInput, TrainingInputError
from lambdas.training.request import resolve as resolve_training

# Step Functions carries at most 262,144 bytes (256 KiB) of UTF-8 as one state's input or output (Step Functions
# service quotas; StateEnteredEventDetails' "Maximum length of 262144"), and StartExecution accepts an input of
# that size. Above it a state fails with States.DataLimitExceeded ("the connector output, state output, or state
# input after Parameters processing is larger than the payload size quota"), "a terminal error that can't be caught
# by the States.ALL error type" (Step Functions developer guide, "Handling errors in Step Functions workflows",
# docs.aws.amazon.com/step-functions/latest/dg/concepts-error-handling.html): the execution just fails. Every state
# after the first carries the normalized input beside the stages' results (pack and training contracts, error
# records); 16 KiB for the input leaves over 240 KiB for them. A real input is well under 2 KiB.
STATE_PAYLOAD_LIMIT_BYTES = 262_144
MAX_INPUT_BYTES = 16 * 1024
# A cause must stay short enough to read in the console and in `invmon pipeline status`; the Lambda error document
# that carries it adds the error type and a one-frame trace (lambdas/execution_input/check.py).
MAX_CAUSE_CHARS = 500
_MAX_PROBLEMS = 4
_MAX_VALUE_CHARS = 40
_MAX_KEY_CHARS = 40


class InvalidExecutionInput(ValueError):
    """The execution input cannot run; the message names the field (``training.instanceCount: ...``)."""


class ExecutionInput(BaseModel):
    """The pipeline's execution input. ``{}`` runs everything with the deployment's defaults."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              strict=True)

    dataset: DatasetRequest | None = Field(default=None, description="Which photos to ingest and how to split them")
    training: TrainingInput | None = Field(default=None, description="The training or tuning job's settings")
    deploy: DeployOptions | None = Field(default=None, description="How the deploy gate decides")


class Allowances(BaseModel):
    """What the stack lets an execution input ask for (the ``allow*`` and cap knobs of cdk.json), handed to the
    first state's function as JSON in its environment."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    allow_network_isolation_off: StrictBool = False
    allow_force_deploy: StrictBool = False
    training_allowed_instance_types: tuple[StrictStr, ...]
    training_max_instance_count: Annotated[StrictInt, Field(ge=1)]
    training_max_seconds: Annotated[StrictInt, Field(ge=60)]
    tuning_max_jobs_cap: Annotated[StrictInt, Field(ge=1)]
    tuning_max_parallel_jobs_cap: Annotated[StrictInt, Field(ge=1)]


# --- readable refusals ---------------------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def shown(value: Any) -> str:
    """A value as a refusal may show it: short ones as written, long ones by type and size, never echoed."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = json.dumps(value)
        if len(text) <= _MAX_VALUE_CHARS:
            return text
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} items"
    return f"a {type(value).__name__}"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (``X | None``, ``Annotated[X, ...]``)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _field(model: type[BaseModel], key: str) -> tuple[str, Any] | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.alias or name, info.annotation
    return None


def _walk(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[list[str], type[BaseModel] | None]:
    """The error location as the user wrote it (camelCase keys, list indices in brackets, pydantic's union tags
    dropped), and the model that holds its last key (None below a free-form object such as hyperparameters)."""
    path: list[str] = []
    model: type[BaseModel] | None = root
    free = False  # inside a dict or list: keys are the user's, not fields
    for part in loc:
        if isinstance(part, int):
            path[-1:] = [f"{path[-1]}[{part}]"] if path else [f"[{part}]"]
            continue
        key = str(part)
        if model is not None:
            found = _field(model, key)
            if found is None:
                path.append(_clip(key, _MAX_KEY_CHARS))
                return path, model
            alias, annotation = found
            path.append(alias)
            models = _models_in(annotation)
            model = models[0] if models else None
            free = model is None
        elif free and not ("[" in key or key in {"str", "int", "float", "bool", "dict", "list", "tuple", "none"}):
            path.append(_clip(key, _MAX_KEY_CHARS))
    return path, None


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def did_you_mean(key: str, model: type[BaseModel], *, listing: bool = True) -> str:
    known = _known_keys(model)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return f"expected one of {', '.join(known)}" if listing else ""


def describe(error: ValidationError, *, root: type[BaseModel] = ExecutionInput) -> str:
    """One clause per field, led by its dotted path; unknown keys get a did-you-mean (the list of known keys once
    per object); values are never echoed at length. Problems at the same path (a union's alternatives) are merged."""
    by_path: dict[str, list[str]] = {}
    listed: set[type[BaseModel]] = set()
    for problem in error.errors(include_url=False):
        path, holder = _walk(tuple(problem["loc"]), root)
        where = ".".join(path) or "input"
        if problem["type"] == "extra_forbidden":
            key = str(problem["loc"][-1])
            hint = did_you_mean(key, holder, listing=holder not in listed) if holder is not None else ""
            if holder is not None and hint.startswith("expected"):
                listed.add(holder)
            message = f"unknown key; {hint}" if hint else "unknown key"
        else:
            message = f"{problem['msg'].removeprefix('Value error, ')} (got {shown(problem.get('input'))})"
        if message not in by_path.setdefault(where, []):
            by_path[where].append(message)
    clauses = [f"{where}: {' or '.join(messages)}" for where, messages in by_path.items()]
    extra = len(clauses) - _MAX_PROBLEMS
    text = "; ".join(_clip(clause, 200) for clause in clauses[:_MAX_PROBLEMS])
    return text + (f"; and {extra} more" if extra > 0 else "")


def refusal(message: str) -> InvalidExecutionInput:
    return InvalidExecutionInput(_clip(f"invalid execution input: {message}", MAX_CAUSE_CHARS))


# --- the controls no input can switch off ----------------------------------------------------------------


def check_allowances(request: ExecutionInput, allowances: Allowances) -> None:
    """Refuse what only the stack may allow; each refusal names the field and the context key that allows it."""
    training = request.training
    if training is not None:
        if training.network_isolation is False and not allowances.allow_network_isolation_off:
            raise refusal("training.networkIsolation: false would let the training container reach the network, "
                          "which this stack does not allow; deploy with -c allowNetworkIsolationOff=true to allow it")
        allowed = allowances.training_allowed_instance_types
        if training.instance_type is not None and training.instance_type not in allowed:
            raise refusal(f"training.instanceType: {shown(training.instance_type)} is not in this stack's "
                          f"allow-list ({', '.join(allowed)}); add it with -c trainingAllowedInstanceTypes=...")
        cap = allowances.training_max_instance_count
        if training.instance_count is not None and training.instance_count > cap:
            raise refusal(f"training.instanceCount: {training.instance_count} is above this stack's cap of {cap}; "
                          f"raise it with -c trainingMaxInstanceCount={training.instance_count}")
        for field, seconds in (("maxRuntimeSeconds", training.max_runtime_seconds),
                               ("maxWaitSeconds", training.max_wait_seconds)):
            if seconds is not None and seconds > allowances.training_max_seconds:
                raise refusal(f"training.{field}: {seconds} is above this stack's cap of "
                              f"{allowances.training_max_seconds} seconds; raise it with "
                              f"-c trainingMaxSeconds={seconds}")
        tuning = training.tuning
        if tuning is not None:
            for field, value, cap, key in (
                ("maxJobs", tuning.max_jobs, allowances.tuning_max_jobs_cap, "tuningMaxJobsCap"),
                ("maxParallelJobs", tuning.max_parallel_jobs, allowances.tuning_max_parallel_jobs_cap,
                 "tuningMaxParallelJobsCap"),
            ):
                if value is not None and value > cap:
                    raise refusal(f"training.tuning.{field}: {value} is above this stack's cap of {cap}; raise it "
                                  f"with -c {key}={value}")
    deploy = request.deploy
    if deploy is not None and deploy.force and not allowances.allow_force_deploy:
        raise refusal("deploy.force: this stack does not let an execution force a deploy past the gate; deploy "
                      "with -c allowForceDeploy=true to allow it")


# --- the door ----------------------------------------------------------------------------------------


def parse(raw: Any) -> ExecutionInput:
    """Size, shape and schema: the checks that need nothing but the input."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise refusal(f"input: expected a JSON object such as {{\"dataset\": {{\"limit\": 100}}}}, got {shown(raw)}")
    size = len(json.dumps(raw, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_INPUT_BYTES:
        largest = max(raw, key=lambda key: len(json.dumps(raw[key], ensure_ascii=False)))
        raise refusal(
            f"input: {size} bytes, above the {MAX_INPUT_BYTES} bytes this pipeline accepts, which leaves room for "
            f"the state data within Step Functions' {STATE_PAYLOAD_LIMIT_BYTES}-byte limit; the largest section is "
            f"{_clip(str(largest), _MAX_KEY_CHARS)}"
        )
    try:
        return ExecutionInput.model_validate(raw)
    except ValidationError as error:
        raise refusal(describe(error)) from None


def check(raw: Any, *, allowances: Allowances, deployment: Deployment, environ: dict[str, str]) -> dict[str, Any]:
    """The whole check of the pipeline's first state; returns the normalized input (camelCase, only what was
    given). ``environ`` holds the ingest defaults (DATASET_SELECTOR, SOURCE_BUCKET, SPLIT_*)."""
    request = parse(raw)
    check_allowances(request, allowances)
    try:
        resolve_dataset(request.dataset or DatasetRequest(), run_id="check", environ=environ)
    except InvalidDatasetRequest as error:
        # Each of resolve's messages starts with the field it is about (minCount, sourceBucket, ...).
        message = str(error).removeprefix("invalid dataset request: ")
        raise refusal(f"dataset.{message}" if message != str(error) else message) from None
    try:
        resolve_training(deployment, request.training or TrainingInput())
    except TrainingInputError as error:
        raise refusal(str(error).removeprefix("invalid training input: ")) from None
    return request.model_dump(mode="json", by_alias=True, exclude_none=True)
