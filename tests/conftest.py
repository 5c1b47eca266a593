"""Fixtures shared by every test package: the shipped sample, ../shared where present, fake AWS settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "data" / "abid-sample"
SHARED_ABID = ROOT.parent / "shared" / "abid"

# No test may reach AWS: fake credentials and a fixed region before boto3 is first used, and no
# instance-metadata lookups.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SECURITY_TOKEN="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20",
    POWERTOOLS_TRACE_DISABLED="true",
    POWERTOOLS_METRICS_NAMESPACE="invmon-tests",
    POWERTOOLS_DEV="false",
)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """240 real ABID photos and metadata shipped with the repository (data/abid-sample)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def shared_abid() -> Path:
    """The 12,038-photo ABID copy beside the checkout; tests that need it skip on a machine without it."""
    if not (SHARED_ABID / "metadata").is_dir():
        pytest.skip(f"needs the shared ABID copy at {SHARED_ABID}, which this machine does not have")
    return SHARED_ABID
