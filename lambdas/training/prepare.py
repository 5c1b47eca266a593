"""Prepare step: execution input + deployment config -> the SageMaker training or tuning request.

Input (built by the state machine)::

    {"input": <execution input>, "channels": <$.pack.channels>, "shards": <$.pack.shards>, "execution": <name>,
     "startedAt": <ISO>}

Output: ``{"mode": "training"|"tuning", "jobName", "timeoutSeconds", "request", "notes"}``. A bad input
fails this step with ``TrainingInputError`` and a message naming the field; no job has started then.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.parser import event_parser
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict

from lambdas.training.request import Deployment, TrainingInputError, build, parse_input

logger = Logger()
tracer = Tracer()

DEPLOYMENT_ENV = "TRAINING_DEPLOYMENT"
# The report step's looks after the job (infra/training.py: up to 16 looks of 2 minutes with 1-minute waits).
REPORT_SECONDS = 16 * 180


class PrepareEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] | None = None
    channels: Any = None
    shards: dict[str, int] | None = None
    execution: str
    startedAt: str


@cache
def deployment() -> Deployment:
    return Deployment.model_validate_json(os.environ[DEPLOYMENT_ENV])


def check_deadline(prepared: dict[str, Any], config: Deployment, started_at: str, now: datetime | None = None) -> None:
    """Refuses a job whose state timeout would run past the training stage's deadline: the execution's timeout is
    fixed at synth from the configuration's budgets (infra/budget.py), and an execution that times out on AWS
    just ends, leaving its job running. Leaves room for the report step after the job."""
    if config.training_deadline_seconds is None:
        return
    started = datetime.fromisoformat(started_at.replace("Z", "+00:00"))
    elapsed = int(((now or datetime.now(UTC)) - started).total_seconds())
    left = config.training_deadline_seconds - elapsed - REPORT_SECONDS
    if prepared["timeoutSeconds"] > left:
        field = "maxWaitSeconds" if prepared["request"].get("EnableManagedSpotTraining") else "maxRuntimeSeconds"
        raise TrainingInputError(
            f"training.{field}: this {prepared['mode']} job may run {prepared['timeoutSeconds']} s with its margin, "
            f"but the execution leaves training {max(left, 0)} s; ask for less, or raise the configuration's "
            "trainingMaxRuntimeSeconds/trainingMaxWaitSeconds (the execution timeout is derived from them)")


def prepare(event: PrepareEvent, config: Deployment) -> dict[str, Any]:
    """The pure part of the handler, for tests and the offline runner."""
    execution_input = event.input or {}
    if not isinstance(execution_input, dict):
        raise TrainingInputError(f"input: expected an object, got {execution_input!r}")
    overrides = parse_input(execution_input.get("training"))
    prepared = build(config, overrides, event.channels, execution=event.execution, started_at=event.startedAt,
                     shards=event.shards)
    check_deadline(prepared, config, event.startedAt)
    return prepared


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@event_parser(model=PrepareEvent)
def handler(event: PrepareEvent, context: LambdaContext) -> dict[str, Any]:
    try:
        result = prepare(event, deployment())
    except TrainingInputError as error:
        logger.warning("training input refused", extra={"reason": str(error)})
        raise
    logger.info(
        "training request prepared",
        extra={"mode": result["mode"], "job_name": result["jobName"], "notes": result["notes"]},
    )
    return result
