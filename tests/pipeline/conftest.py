"""The app synthesized once per session for the execution tests, and moto with its interpreter switched on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto import mock_aws

from invmon import execution as offline
from tests.pipeline import harness


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> offline.Synthesized:
    return offline.synthesize(tmp_path_factory.mktemp("cdk.out"))


@pytest.fixture(scope="session")
def resolver(synthesized: offline.Synthesized) -> offline.Resolver:
    return offline.Resolver(synthesized.template)


@dataclass
class Cloud:
    """moto's AWS for one test, with the stack's buckets and tables created under the names used offline."""

    synthesized: offline.Synthesized
    resolver: offline.Resolver
    lambdas: offline.InProcessLambda
    bridge: harness.ScriptedSageMaker

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=offline.REGION)

    def definition(self, prefix: str, **rewrites: Any) -> dict[str, Any]:
        logical_id = self.synthesized.logical_id("AWS::StepFunctions::StateMachine", prefix)
        return offline.for_moto(self.resolver.definition(logical_id), **rewrites)

    def name(self, kind: str, prefix: str) -> str:
        return offline.physical_name(self.synthesized.logical_id(kind, prefix))

    def run(self, definition: dict[str, Any], execution_input: Any, name: str = "run") -> offline.Execution:
        return offline.run(self.client("stepfunctions"), definition, execution_input, name=name)


@pytest.fixture
def cloud(synthesized: offline.Synthesized, resolver: offline.Resolver) -> Iterator[Cloud]:
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        offline.create_resources(synthesized)
        lambdas = offline.InProcessLambda(offline.lambda_functions(synthesized, resolver))
        bridge = harness.ScriptedSageMaker()
        with offline.interpreter(lambdas, bridge), harness.scripted_endpoints(bridge):
            yield Cloud(synthesized, resolver, lambdas, bridge)
