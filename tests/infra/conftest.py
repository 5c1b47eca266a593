"""The whole app, synthesized once per test session in-process, the way `cdk synth` builds it."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Annotations, Match, Template

from app import build_app
from infra.config import default_context
from infra.stack import InvmonStack


def echo_input_check(scope: cdk.Stack) -> Any:
    """A stand-in for the first state's input check, for tests that compose the pipeline from a few stages."""
    from aws_cdk import aws_lambda as lambda_

    return lambda_.Function(scope, "Check", runtime=lambda_.Runtime.PYTHON_3_12, handler="index.handler",
                            code=lambda_.Code.from_inline("def handler(event, context):\n    return event\n"))


def synth_stack(overrides: dict[str, Any] | None = None) -> InvmonStack:
    app = build_app(cdk.App(context=default_context() | dict(overrides or {})))
    (stack,) = [child for child in app.node.children if isinstance(child, InvmonStack)]
    return stack


def nag_findings(stack: cdk.Stack, level: str = "error") -> list[str]:
    annotations = Annotations.from_stack(stack)
    find = annotations.find_error if level == "error" else annotations.find_warning
    return [f"{m.id}: {m.entry.data}" for m in find("*", Match.string_like_regexp("AwsSolutions-.*"))]


@pytest.fixture(scope="session")
def stack() -> InvmonStack:
    return synth_stack()


@pytest.fixture(scope="session")
def template(stack: InvmonStack) -> Template:
    return Template.from_stack(stack)


def definition_of(machine: dict[str, Any]) -> dict[str, Any]:
    """The state machine definition of a synthesized ``AWS::StepFunctions::StateMachine`` resource as a dict.

    CloudFormation joins the definition from strings and references (ARNs, names); references become the
    placeholder ``"${ref}"`` so the JSON parses and its structure can be asserted.
    """
    definition = machine["Properties"]["DefinitionString"]
    if isinstance(definition, dict) and "Fn::Join" in definition:
        definition = "".join(part if isinstance(part, str) else "${ref}" for part in definition["Fn::Join"][1])
    return json.loads(definition)
