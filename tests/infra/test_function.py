"""The shared Lambda code asset as `cdk synth` stages it."""

from __future__ import annotations

from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_lambda as lambda_

from infra.function import RUNTIME, code_asset


def staged_code(tmp_path: Path) -> Path:
    app = cdk.App(outdir=str(tmp_path))
    stack = cdk.Stack(app, "AssetTest")
    lambda_.Function(stack, "Function", runtime=RUNTIME, handler="lambdas.count.handler.handler", code=code_asset())
    assembly = app.synth()
    (staged,) = [p for p in Path(assembly.directory).glob("asset.*") if p.is_dir()]
    return staged


def test_code_asset_holds_the_lambdas_and_the_trainer_sources_but_no_dot_files_or_caches(tmp_path: Path) -> None:
    # Dot-files and caches exist in every checkout that ran the tests (.venv/.installed-stamp, .pytest_cache,
    # __pycache__, .git in a worktree); one in the zip makes its hash follow local state.
    staged = staged_code(tmp_path)
    names = {p.relative_to(staged).as_posix() for p in staged.rglob("*")}
    assert {"lambdas/__init__.py", "ml/abid.py", "ml/train.py"} <= names
    stray = sorted(n for n in names if any(part.startswith(".") or part == "__pycache__" or part.endswith(".pyc")
                                            for part in n.split("/")))
    assert stray == []
    assert {n.split("/")[0] for n in names} == {"lambdas", "ml"}
