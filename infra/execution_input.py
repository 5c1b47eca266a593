"""The execution-input check: the function the pipeline's first state runs (lambdas/execution_input/check.py).

Its environment holds what it checks an input against: the training deployment (the same JSON the prepare step
reads), the ingest defaults (the same variables the select step reads) and the stack's allowances, the controls no
input can switch off (network isolation, instance types and counts, job runtimes, tuning jobs, forced deploys).
It reads nothing and writes nothing in AWS: its role holds only its log group and X-Ray.
"""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import Settings
from infra.function import PythonFunction
from infra.nag import suppress, wildcard_suppression
from lambdas.execution_input.check import ALLOWANCES_ENV

# The ingest variables that resolve() reads (lambdas/ingest/request.py); the others belong to the copy workers.
DATASET_DEFAULTS = ("DATASET_SELECTOR", "SOURCE_BUCKET", "SPLIT_VALIDATION_FRACTION", "SPLIT_TEST_FRACTION")


def allowances(settings: Settings) -> dict[str, Any]:
    """The allowances as the function reads them (lambdas/execution_input/schema.Allowances)."""
    return {
        "allowNetworkIsolationOff": settings.allow_network_isolation_off,
        "allowForceDeploy": settings.allow_force_deploy,
        "trainingAllowedInstanceTypes": list(settings.training_allowed_instance_types),
        "trainingMaxInstanceCount": settings.training_max_instance_count,
        "trainingMaxSeconds": settings.training_max_seconds,
        "tuningMaxJobsCap": settings.tuning_max_jobs_cap,
        "tuningMaxParallelJobsCap": settings.tuning_max_parallel_jobs_cap,
    }


class ExecutionInputCheck(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings,
                 ingest_environment: dict[str, str], training_environment: dict[str, str]) -> None:
        super().__init__(scope, construct_id)
        self.check = PythonFunction(
            self, "Check",
            settings=settings,
            handler="lambdas.execution_input.check.handler",
            service="execution-input",
            description=f"{settings.project} pipeline: checks the execution input against its schema and the "
                        "stack's allowances",
            environment={
                **{name: ingest_environment[name] for name in DATASET_DEFAULTS},
                **training_environment,
                ALLOWANCES_ENV: json.dumps(allowances(settings), separators=(",", ":")),
            },
            timeout_seconds=30,
            memory_size=256,
        )
        self.function = self.check.function

    def add_nag_evidence(self, state_machine: sfn.StateMachine) -> None:
        """cdk-nag suppression for the one wildcard the first state grants the state machine that hosts it."""
        suppress(
            state_machine,
            wildcard_suppression(
                state_machine, "LambdaInvoke grants the function ARN plus ':*' so that the first state may call a "
                "version or alias of the execution-input check function, and nothing else.",
                resources=[f"{self.function.function_arn}:*"],
            ),
        )
