"""The pipeline's time budget: the longest each stage can run, and the execution timeout as their sum.

On AWS an execution that reaches its TimeoutSeconds just ends: no Catch runs, nothing stops the job it started
(Step Functions developer guide, "States.Timeout"). So the timeout is derived from the stages' own bounded waits,
and a job that could outlive it is refused: at synth for the configuration's defaults, and by the prepare step
for an execution's input (lambdas/training/prepare.py).
"""

from __future__ import annotations

import math

from infra.config import ConfigError, Settings

# Ingest (a Distributed Map of server-side copies) and pack (a Distributed Map of packers) over the whole
# dataset (about 536,000 photos): each well under four hours at their default concurrency.
INGEST_SECONDS = 4 * 3600
PACK_SECONDS = 4 * 3600
# A Standard workflow's longest execution: one year (Step Functions developer guide, "Step Functions service
# quotas", "Maximum execution time").
MAX_EXECUTION_SECONDS = 365 * 24 * 3600


def training_stage_seconds(settings: Settings) -> int:
    from infra.training import stage_timeout_seconds

    return stage_timeout_seconds(settings)


def training_deadline_seconds(settings: Settings) -> int:
    """Seconds after the execution's start by which the training stage must have ended, leaving the deploy
    stage its whole budget."""
    return INGEST_SECONDS + PACK_SECONDS + training_stage_seconds(settings)


def deploy_stage_seconds(settings: Settings) -> int:
    from infra.deploy import stage_budget_seconds

    return stage_budget_seconds(settings)


def execution_timeout_seconds(settings: Settings) -> int:
    return training_deadline_seconds(settings) + deploy_stage_seconds(settings)


def check(settings: Settings) -> None:
    """Refuses a configuration whose jobs could outlive what holds them: a tuning job's trials beyond the tuning
    job's own MaxRuntimeInSeconds (SageMaker's 30-day limit), or an execution beyond Step Functions' year."""
    from lambdas.training.request import MAX_TUNING_SECONDS

    job = settings.training_max_wait_seconds if settings.training_use_spot else settings.training_max_runtime_seconds
    waves = math.ceil(settings.tuning_max_jobs / settings.tuning_max_parallel_jobs)
    if waves * job > MAX_TUNING_SECONDS:
        raise ConfigError(
            f"tuningMaxJobs: {settings.tuning_max_jobs} trials, {settings.tuning_max_parallel_jobs} at a time, of "
            f"up to {job} s each need {waves * job} s, beyond a tuning job's limit of {MAX_TUNING_SECONDS} s; "
            "lower tuningMaxJobs or trainingMaxWaitSeconds/trainingMaxRuntimeSeconds, or raise "
            "tuningMaxParallelJobs")
    total = execution_timeout_seconds(settings)
    if total > MAX_EXECUTION_SECONDS:
        raise ConfigError(f"trainingMaxRuntimeSeconds: the pipeline's stages need {total} s, beyond Step Functions' "
                          f"longest execution of {MAX_EXECUTION_SECONDS} s")
