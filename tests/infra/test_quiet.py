"""The README's `npx cdk ...` commands print no Node end-of-life banner (issue 24, item 5). The banner comes from
the jsii runtime the app starts when it imports aws_cdk; cdk.json's app command silences it for the Node major
version in use (jsii reads JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION as a comma-separated list of majors).
The "feature flags are not configured" line cannot be turned off (aws/aws-cdk-cli#913, open): it is explained
once, in docs/configuration.md."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VARIABLE = "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION"


def _app_environment() -> dict[str, str]:
    """The VAR=value words in front of cdk.json's app command, as the shell that runs it applies them."""
    words = shlex.split(json.loads((ROOT / "cdk.json").read_text())["app"])
    return dict(word.split("=", 1) for word in words if "=" in word and not word.startswith(("-", ".", "/")))


def _import_cdk(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE} | extra
    done = subprocess.run([sys.executable, "-c", "import aws_cdk"], env=env, capture_output=True, text=True,
                          timeout=120, check=True, cwd=ROOT)
    return done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node, as the CDK does")
def test_the_app_command_silences_the_node_end_of_life_banner_for_this_node() -> None:
    major = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout
    major = major.strip().lstrip("v").split(".")[0]
    silenced = _app_environment().get(VARIABLE, "")
    banner = _import_cdk({})
    if "end-of-life" not in banner:
        pytest.skip(f"Node {major} is still supported by jsii: no banner to silence")
    assert major in [v.strip() for v in silenced.split(",")], f"cdk.json's app command should set {VARIABLE}"
    assert "end-of-life" not in _import_cdk(_app_environment())


def test_the_feature_flags_message_is_explained_once() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    assert reference.count("feature flags are not configured") == 1
