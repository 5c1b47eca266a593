"""cdk-nag wiring: the AwsSolutions pack on the whole app, and one place for app-wide suppressions."""

from __future__ import annotations

from aws_cdk import App, Aspects
from cdk_nag import AwsSolutionsChecks


def apply_checks(app: App) -> None:
    """Run AwsSolutions on every construct. Findings surface as synth errors and warnings; a suppression
    lives next to the resource it concerns, with its reason."""
    Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
