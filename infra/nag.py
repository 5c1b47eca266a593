"""cdk-nag wiring: the AwsSolutions pack on the whole app, and the helpers that write IAM suppressions limited
to the exact findings they cover."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from aws_cdk import App, Arn, ArnFormat, Aspects, Stack
from aws_cdk import aws_stepfunctions as sfn
from cdk_nag import AwsSolutionsChecks, NagPackSuppression, NagSuppressions
from constructs import IConstruct


def apply_checks(app: App) -> None:
    """Run AwsSolutions on every construct. Findings surface as synth errors and warnings; a suppression
    lives next to the resource it concerns, with its reason."""
    Aspects.of(app).add(AwsSolutionsChecks(verbose=True))


# Evidence for AwsSolutions-IAM4/IAM5 suppressions. cdk-nag names each wildcard finding after the statement as
# CloudFormation will see it ("Action::s3:List*", "Resource::<DataBucket.Arn>/raw/*"), and a suppression
# without appliesTo hides every finding of its rule, including wildcards added later. These helpers turn the
# very expressions a grant was written with into those finding strings, so a suppression lists exactly the
# wildcards its construct grants, in the form they take under any deploy environment (concrete or not).

IAM4 = "AwsSolutions-IAM4"
IAM5 = "AwsSolutions-IAM5"
XRAY_REASON = (
    "X-Ray's PutTraceSegments/PutTelemetryRecords (active tracing) accept no resource narrower than '*'."
)
# Every state machine with tracing and logging (the pipeline, bulk counting) holds these on '*'.
STATE_MACHINE_REASON = (
    "A state machine with X-Ray tracing and CloudWatch Logs delivery needs xray:PutTraceSegments/"
    "PutTelemetryRecords/GetSampling* and logs:*LogDelivery/PutResourcePolicy/Describe*, none of which "
    "accepts a resource narrower than '*'."
)


def flatten(value: Any) -> str:
    """A resolved CloudFormation value as cdk-nag's ``flattenCfnReference`` writes it in a finding."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("${", "<").replace("}", ">")
    if isinstance(value, dict):
        if "Fn::Join" in value:
            delimiter, items = value["Fn::Join"]
            return delimiter.join(flatten(item) for item in items)
        if "Fn::Sub" in value:
            return flatten(value["Fn::Sub"])
        if "Fn::GetAtt" in value:
            resource, attribute = value["Fn::GetAtt"]
            return f"<{flatten(resource)}.{flatten(attribute)}>"
        if "Fn::ImportValue" in value:
            return flatten(value["Fn::ImportValue"])
        if "Ref" in value:
            return f"<{flatten(value['Ref'])}>"
    return json.dumps(value, separators=(",", ":"))


def resource_finding(scope: IConstruct, arn: str) -> str:
    """The IAM5 finding for a statement resource, written as the grant's own ARN expression."""
    return f"Resource::{flatten(Stack.of(scope).resolve(arn))}"


def action_finding(action: str) -> str:
    return f"Action::{action}"


def wildcard_suppression(
    scope: IConstruct,
    reason: str,
    *,
    actions: Sequence[str] = (),
    resources: Sequence[str] = (),
) -> NagPackSuppression:
    """An AwsSolutions-IAM5 suppression limited to these wildcard actions and these resource ARN expressions
    (turned into findings with :func:`resource_finding`, so pass the same expressions the grant used)."""
    applies_to = [action_finding(action) for action in actions] + [resource_finding(scope, arn) for arn in resources]
    if not applies_to:
        raise ValueError("a wildcard suppression must name the findings it covers")
    return NagPackSuppression(id=IAM5, reason=reason, applies_to=list(dict.fromkeys(applies_to)))


def suppress(construct: IConstruct, *suppressions: NagPackSuppression) -> None:
    """Attach suppressions to ``construct`` and its children (a role and its default policy)."""
    NagSuppressions.add_resource_suppressions(construct, list(suppressions), apply_to_children=True)


def distributed_map_children(state_machine: sfn.StateMachine) -> NagPackSuppression:
    """The wildcard CDK grants a state machine that hosts an unlabelled Distributed Map: its own child executions,
    written the way CDK's state graph writes them."""
    stack = Stack.of(state_machine)
    name = Arn.split(state_machine.state_machine_arn, ArnFormat.COLON_RESOURCE_NAME).resource_name
    executions = [
        stack.format_arn(service="states", resource="execution", resource_name=f"{name}{suffix}",
                         arn_format=ArnFormat.COLON_RESOURCE_NAME)
        for suffix in (":*", "/*:*")
    ]
    return wildcard_suppression(
        state_machine,
        "A Distributed Map starts, describes, stops and redrives its own child executions, whose names "
        "Step Functions generates: CDK limits the grant to executions of this state machine.",
        resources=executions,
    )
