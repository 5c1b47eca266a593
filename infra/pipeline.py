"""The pipeline state machine: ingest, train (or tune), deploy, composed from each domain's fragment.

Each stage runs inside a one-branch Parallel state. That gives every stage the same failure path without the
stages knowing about each other: any error that a stage does not handle itself is caught here, recorded at
``$.error`` with the stage's name, and the execution fails with that cause (after the stage has cleaned up
what it started, which is the stage's own job).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Duration
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.config import Settings
from infra.function import log_group


class StageFragment(sfn.StateMachineFragment):
    """A stage's states, from the one it starts at to the ones it ends at; a subclass builds them and then calls
    ``_bound`` with the two."""

    def _bound(self, start: sfn.State, ends: Sequence[sfn.INextable]) -> None:
        self._start = start
        self._ends = list(ends)

    @property
    def start_state(self) -> sfn.State:
        return self._start

    @property
    def end_states(self) -> list[sfn.INextable]:
        return self._ends


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``name`` is also the key of its result in the state (``$.<name>``)."""

    name: str
    fragment: sfn.StateMachineFragment


class Pipeline(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        stages: Sequence[Stage],
        input_check: lambda_.IFunction,
        timeout_hours: int = 48,
    ) -> None:
        super().__init__(scope, construct_id)
        # The first state: the execution input ($, passed whole: a wrapper around an input near Step Functions'
        # 262,144-byte limit would itself overflow it) is checked against the one schema and the stack's allowances
        # (lambdas/execution_input/check.py). A refusal fails the execution here, with a cause naming the field;
        # otherwise the state becomes {"input": <normalized input>, "execution": <name>}, and the raw input is
        # never carried further.
        prepare = tasks.LambdaInvoke(
            self,
            "Check input",
            comment="Checks the execution input ({} means every default); a refusal names the field and ends here",
            lambda_function=input_check,
            # No payload: with payloadResponseOnly the task then hands the function its whole input ($) as is.
            payload_response_only=True,
            result_selector={"input.$": "$", "execution.$": "$$.Execution.Name"},
            result_path="$",
        )
        failed = sfn.Fail(
            self,
            "Pipeline failed",
            comment="A stage failed after cleaning up; the cause says which stage and why",
            error_path="$.error.Error",
            cause_path="$.error.Cause",
        )
        chain = sfn.Chain.start(prepare)
        for stage in stages:
            wrapper = sfn.Parallel(
                self,
                f"{stage.name.capitalize()} stage",
                comment=f"Runs the {stage.name} stage; its output replaces the state, which keeps $.input",
                output_path="$[0]",
            )
            wrapper.branch(stage.fragment)

            def record(construct_id: str, cause: str, name: str = stage.name) -> sfn.Chain:
                return sfn.Pass(self, construct_id, parameters={"stage": name, "Error.$": "$.failure.Error",
                                                                "Cause.$": cause},
                                result_path="$.error").next(failed)

            caused = record(f"Record {stage.name} failure",
                            "States.Format('{} stage failed: {}', '" + stage.name + "', $.failure.Cause)")
            # A States.Timeout (or any error raised without one) has no cause: reading the absent path would be
            # States.Runtime, which nothing catches, and an empty one reads "stage failed: ". Say what is known.
            causeless = record(f"Record {stage.name} failure without cause",
                               "States.Format('{} stage failed: {} (the error came with no cause; a States.Timeout "
                               "is a state that ran past its TimeoutSeconds, see the execution history)', '"
                               + stage.name + "', $.failure.Error)")
            wrapper.add_catch(
                # Rules are tried in order and the first match wins, so no rule reads an absent or non-string
                # path.
                sfn.Choice(self, f"{stage.name.capitalize()} failure has a cause?")
                .when(sfn.Condition.is_not_present("$.failure.Cause"), causeless)
                .when(sfn.Condition.is_not_string("$.failure.Cause"), causeless)
                .when(sfn.Condition.string_equals("$.failure.Cause", ""), causeless)
                .otherwise(caused),
                result_path="$.failure",
            )
            chain = chain.next(wrapper)
        chain = chain.next(sfn.Succeed(self, "Pipeline succeeded"))

        self.log_group = log_group(self, settings)
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            comment=f"{settings.project}: ingest ABID, train a counting model on SageMaker, deploy it",
            definition_body=sfn.DefinitionBody.from_chainable(chain),
            # A backstop above the stages' own timeouts, so a stuck execution cannot run (and bill) forever.
            timeout=Duration.hours(timeout_hours),
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
        )
