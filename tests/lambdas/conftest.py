"""Helpers for calling Lambda handlers in-process, as the Lambda runtime would."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class FakeLambdaContext:
    """The attributes Powertools reads from the real context object."""

    function_name: str = "invmon-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:invmon-test"
    aws_request_id: str = "00000000-0000-0000-0000-000000000000"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


@pytest.fixture
def lambda_context() -> FakeLambdaContext:
    return FakeLambdaContext()
