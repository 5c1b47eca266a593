#!/usr/bin/env python3
"""CDK entry point: settings from the context, the invmon stack, and cdk-nag's AwsSolutions checks."""

from __future__ import annotations

import os
import sys

import aws_cdk as cdk

from infra.config import ConfigError, check_context_keys, settings_from_context
from infra.nag import apply_checks
from infra.stack import InvmonStack


def build_app(app: cdk.App | None = None) -> cdk.App:
    app = app or cdk.App()
    check_context_keys(app.node.get_all_context())
    settings = settings_from_context(app.node.try_get_context)
    InvmonStack(
        app,
        f"{settings.project.capitalize()}-{settings.stage}",
        settings=settings,
        description=f"{settings.project}: counts the objects in warehouse bin photos ({settings.stage})",
        # The account and region come from the deploying credentials; synth without any stays environment-agnostic.
        env=cdk.Environment(
            account=os.environ.get("CDK_DEFAULT_ACCOUNT"), region=os.environ.get("CDK_DEFAULT_REGION")
        ),
    )
    apply_checks(app)
    return app


if __name__ == "__main__":
    try:
        build_app().synth()
    except ConfigError as error:
        print(f"invmon: {error}", file=sys.stderr)
        sys.exit(1)
