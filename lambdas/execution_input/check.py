"""The pipeline's first state: the raw execution input -> the normalized input, or a refusal naming the field.

Input: the execution input itself (the task passes ``$`` whole, so an input of any size StartExecution accepted
arrives here rather than overflowing a wrapper). Output: the normalized input (lambdas/execution_input/schema.py),
which the state machine keeps at ``$.input`` in place of the raw one.

A refusal raises :class:`InvalidExecutionInput` from the handler's own frame, outside any decorator and any
``except`` block, so the error document Lambda returns (errorMessage, errorType, a one-frame stackTrace) stays well
under 1,000 characters: it is the execution's cause.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from aws_lambda_powertools import Logger

from lambdas.execution_input.schema import Allowances, InvalidExecutionInput, check
from lambdas.training.prepare import DEPLOYMENT_ENV
from lambdas.training.request import Deployment

logger = Logger()

ALLOWANCES_ENV = "EXECUTION_INPUT_ALLOWANCES"


@lru_cache(maxsize=4)
def _allowances(document: str) -> Allowances:
    return Allowances.model_validate_json(document)


@lru_cache(maxsize=4)
def _deployment(document: str) -> Deployment:
    return Deployment.model_validate_json(document)


def handler(event: Any, context: Any) -> dict[str, Any]:
    try:
        normalized = check(event, allowances=_allowances(os.environ[ALLOWANCES_ENV]),
                           deployment=_deployment(os.environ[DEPLOYMENT_ENV]), environ=dict(os.environ))
    except InvalidExecutionInput as error:
        reason = str(error)
    else:
        logger.info("execution input accepted", extra={"sections": sorted(normalized)})
        return normalized
    logger.warning("execution input refused", extra={"reason": reason})
    raise InvalidExecutionInput(reason)
