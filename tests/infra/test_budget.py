"""The pipeline's time budget (infra/budget.py): the execution outlives every job it may start."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from infra import budget
from infra.config import ConfigError, load_settings
from lambdas.training.prepare import check_deadline
from lambdas.training.request import Deployment, TrainingInputError
from tests.lambdas.test_training import STARTED, deployment, prepared


def pipeline_timeout(template) -> int:
    machines = template.find_resources("AWS::StepFunctions::StateMachine")
    (pipeline,) = [m for name, m in machines.items() if name.startswith("PipelineStateMachine")]
    definition = pipeline["Properties"]["DefinitionString"]
    parts = definition["Fn::Join"][1] if isinstance(definition, dict) else [definition]
    import json

    return json.loads("".join(p if isinstance(p, str) else "X" for p in parts))["TimeoutSeconds"]


def test_the_execution_outlives_the_default_tuning_job_and_the_deploy_after_it(template):
    # Before: 22 h, while a tuning job with the default knobs (8 trials, 2 at a time, 8 h spot wait) may run 33 h.
    settings = load_settings()
    tuning = prepared({"tuning": {"enabled": True}})
    timeout = pipeline_timeout(template)
    assert timeout == -(-budget.execution_timeout_seconds(settings) // 3600) * 3600
    assert timeout >= budget.INGEST_SECONDS + budget.PACK_SECONDS + tuning["timeoutSeconds"] \
        + budget.deploy_stage_seconds(settings)


def test_a_job_an_execution_asks_for_beyond_the_budget_is_refused_before_it_starts():
    # A 28-day job was accepted; the execution would have timed out around it and left it running.
    config = deployment(trainingDeadlineSeconds=budget.training_deadline_seconds(load_settings()))
    long_job = prepared({"maxRuntimeSeconds": 28 * 24 * 3600, "maxWaitSeconds": 28 * 24 * 3600}, config=config)
    with pytest.raises(TrainingInputError, match=r"training\.maxWaitSeconds: this training job may run .* but the "
                                                 r"execution leaves training \d+ s"):
        check_deadline(long_job, config, STARTED)
    check_deadline(prepared(config=config), config, STARTED,
                   now=datetime.fromisoformat(STARTED.replace("Z", "+00:00")) + timedelta(hours=3))


def test_a_config_without_a_deadline_is_not_checked():
    check_deadline(prepared({"maxRuntimeSeconds": 3600}), deployment(), STARTED)
    assert Deployment.model_fields["training_deadline_seconds"].default is None


def test_synth_refuses_tuning_trials_that_cannot_fit_a_tuning_jobs_limit():
    with pytest.raises(ConfigError, match="tuningMaxJobs: 100 trials, 1 at a time"):
        budget.check(load_settings({"tuningMaxJobs": 100, "tuningMaxJobsCap": 100, "tuningMaxParallelJobs": 1}))
