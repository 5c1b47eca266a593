"""checkov on the synthesized templates of the four variants a deployment can take (issue #23, item 9).

Every finding checkov reports is either fixed or listed in tests/infra/checkov-skips.json with its kind
("noise": the check does not apply to this design; "acceptable": it applies and the design accepts it) and a
one-line reason. A failure of any other check fails the test, and so does a skip that no variant needs any more.

Cost: four synths (the default one is the session's) and one checkov run per variant, all in one module fixture:
about 2-3 minutes on one core, most of it checkov's graph build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Template

from tests.infra.conftest import synth_stack

SKIPS_FILE = Path(__file__).with_name("checkov-skips.json")
# checkov has an environment of its own (see pyproject's "checkov" extra); one on PATH serves as well.
CHECKOV = shutil.which("checkov", path=str(Path(__file__).resolve().parents[2] / ".venv-checkov" / "bin")) \
    or shutil.which("checkov")
VARIANTS = {
    "default": {},
    "studio": {"studioDomain": True},
    "studio-vpconly-prod": {"studioDomain": True, "studioNetworkAccess": "VpcOnly", "stage": "prod"},
    "realtime-tuning": {"endpointMode": "realtime", "tuningEnabled": True},
}

pytestmark = pytest.mark.skipif(CHECKOV is None, reason="checkov is not installed: run `make setup`")


def load_skips() -> dict[str, dict[str, str]]:
    return json.loads(SKIPS_FILE.read_text())


def run_checkov(template: Path) -> dict[str, Any]:
    result = subprocess.run(
        [CHECKOV, "--quiet", "--compact", "--framework", "cloudformation", "--output", "json",
         "--skip-download", "--file", str(template)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    # Exit status 1 means "some check failed"; anything else but 0 is checkov itself failing.
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.fixture(scope="module")
def reports(template, tmp_path_factory) -> dict[str, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("checkov")
    found = {}
    for variant, context in VARIANTS.items():
        body = template.to_json() if not context else Template.from_stack(synth_stack(context)).to_json()
        path = folder / f"{variant}.template.json"
        path.write_text(json.dumps(body))
        found[variant] = run_checkov(path)
    return found


def failed(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [(check["check_id"], check["resource"]) for check in report["results"]["failed_checks"]]


def skipped(finding: tuple[str, str], skips: dict[str, dict[str, Any]]) -> bool:
    """A finding a skip covers: every resource, or only those whose ``Type.LogicalId`` starts with one of the
    skip's ``resources`` (a skip for one resource must not hide the same finding on another)."""
    check, resource = finding
    skip = skips.get(check)
    return skip is not None and any(resource.startswith(prefix) for prefix in skip.get("resources", [""]))


def test_every_skip_says_whether_it_is_noise_or_acceptable_and_why():
    for check, skip in load_skips().items():
        assert skip["kind"] in ("noise", "acceptable"), check
        assert skip["reason"].strip() and "\n" not in skip["reason"], check


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkov_finds_nothing_outside_the_reasoned_skips(reports, variant):
    skips = load_skips()
    report = reports[variant]
    summary = report["summary"]
    print(f"{variant}: {summary['passed']} passed, {summary['failed']} failed "
          f"({len([f for f in failed(report) if skipped(f, skips)])} skipped with a reason)")
    assert [f for f in failed(report) if not skipped(f, skips)] == []


def test_no_skip_outlives_the_finding_it_covers(reports):
    used = {check for report in reports.values() for check, _ in failed(report)}
    assert sorted(set(load_skips()) - used) == []
