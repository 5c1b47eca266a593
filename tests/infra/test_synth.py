"""`npx cdk synth` as a user runs it: offline, with the pinned CLI, and failing on a wrong context value."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CDK = ROOT / "node_modules" / ".bin" / "cdk"

pytestmark = pytest.mark.skipif(not CDK.exists(), reason="the CDK CLI is not installed: run `make setup`")


def _cdk_synth(outdir: Path, *context: str) -> subprocess.CompletedProcess[str]:
    args = [str(CDK), "synth", "--quiet", "--no-notices", "--output", str(outdir)]
    for item in context:
        args += ["--context", item]
    env = os.environ | {
        "CDK_DISABLE_VERSION_CHECK": "true",
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
        # The app command in cdk.json uses the project's virtual environment; the test may run from another.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    app = f"{sys.executable} app.py"
    return subprocess.run(
        [*args, "--app", app], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("cdk.out")
    result = _cdk_synth(outdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return outdir


def test_cdk_synth_writes_a_template_offline(synthesized):
    templates = list(synthesized.glob("*.template.json"))
    assert templates, "no template written"
    template = json.loads(templates[0].read_text())
    assert "AWS::S3::Bucket" in {resource["Type"] for resource in template["Resources"].values()}


def test_cfn_lint_reports_no_error_on_the_synthesized_templates(synthesized):
    cfn_lint = shutil.which("cfn-lint", path=str(Path(sys.executable).parent))
    assert cfn_lint, "cfn-lint is part of the dev extra"
    result = subprocess.run(
        [cfn_lint, "--format", "parseable", *map(str, synthesized.glob("*.template.json"))],
        capture_output=True, text=True, check=False,
    )
    # cfn-lint's exit status is a bit mask: 2 means at least one error (4 warnings, 8 informational).
    assert result.returncode & 2 == 0, result.stdout


def test_a_typo_in_a_context_value_fails_synth_naming_the_key(tmp_path):
    result = _cdk_synth(tmp_path, "trainingInstanceCount=three")
    assert result.returncode != 0
    assert "trainingInstanceCount: expected an integer, got 'three'" in result.stderr
