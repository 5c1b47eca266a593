"""The pack construct synthesized in a test stack (the Distributed Map over the plan, its wiring to the
functions, least-privilege IAM, cdk-nag), and in the app: the stage between ingest and training."""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import Aspects
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk.assertions import Annotations, Match, Template
from cdk_nag import AwsSolutionsChecks, NagPackSuppression, NagSuppressions

from infra import storage as storage_module
from infra.config import default_context, settings_from_context
from infra.pack import PACK_THREADS, Pack
from infra.storage import Storage
from lambdas.pack import layout
from tests.infra.conftest import definition_of
from tests.infra.test_ingest import actions, machine_definition, resources, statements_of

BUCKET = "<StorageData6BB23F4E.Arn>"


def build(overrides: dict[str, Any] | None = None):
    app = cdk.App(context=default_context() | dict(overrides or {}))
    settings = settings_from_context(app.node.try_get_context)
    stack = cdk.Stack(app, "PackTest")
    storage = Storage(stack, "Storage", settings=settings)
    pack = Pack(stack, "Pack", settings=settings, data_bucket=storage.data, data_key=storage.key)
    start = sfn.Pass(stack, "Prepare", parameters={"input.$": "$$.Execution.Input", "execution.$": "$$.Execution.Name"})
    machine = sfn.StateMachine(
        stack, "Machine", definition_body=sfn.DefinitionBody.from_chainable(start.next(pack.stage)),
        tracing_enabled=True,
        logs=sfn.LogOptions(destination=logs.LogGroup(stack, "MachineLogs"), level=sfn.LogLevel.ALL),
    )
    pack.add_nag_evidence(machine)
    # The throwaway machine's own logging and tracing grants are the pipeline's business, not this stage's.
    NagSuppressions.add_resource_suppressions(
        machine, [NagPackSuppression(id="AwsSolutions-IAM5", reason="test machine: log delivery and X-Ray take '*'",
                                     applies_to=["Resource::*"])], apply_to_children=True)
    Aspects.of(app).add(AwsSolutionsChecks())
    return stack, Template.from_stack(stack), settings


@pytest.fixture(scope="module")
def synthesized():
    return build()


def functions(template: Template) -> dict[str, dict[str, Any]]:
    return {r["Properties"]["Handler"]: r["Properties"]
            for r in template.find_resources("AWS::Lambda::Function").values()}


def test_the_map_reads_the_plan_and_packs_one_shard_per_child(synthesized) -> None:
    _, template, settings = synthesized
    states = machine_definition(template)["States"]
    pack = states["PackShards"]
    assert pack["Type"] == "Map"
    assert pack["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
    assert pack["ItemReader"]["Resource"].endswith(":states:::s3:getObject")
    assert pack["ItemReader"]["ReaderConfig"] == {"InputType": "JSON"}
    assert pack["ItemReader"]["Parameters"]["Key.$"] == "$.pack.planKey"
    assert "ItemBatcher" not in pack and "ItemSelector" not in pack  # each plan item is one packer's event
    assert pack["MaxConcurrency"] == settings.pack_max_concurrency == 40
    # Every shard runs; the finish step applies ingestToleratedFailurePercent per photo.
    assert pack["ToleratedFailurePercentage"] == 100
    assert pack["ResultWriter"]["Parameters"]["Prefix"] == layout.MAP_RESULTS_PREFIX == "reports/pack/map-results"
    assert pack["ResultPath"] == "$.pack.packed"
    shard = pack["ItemProcessor"]["States"]["PackShard"]
    assert "Parameters" not in shard and "InputPath" not in shard
    retried = {error for rule in shard["Retry"] for error in rule["ErrorEquals"]}
    assert "TransientPackError" in retried and "States.ALL" not in retried


def test_stage_runs_plan_pack_finish_and_leaves_its_result_at_pack(synthesized) -> None:
    _, template, _ = synthesized
    states = machine_definition(template)["States"]
    plan, finish = states["PlanShards"], states["FinishPack"]
    assert states["Prepare"]["Next"] == "PlanShards"
    assert plan["Next"] == "PackShards" and states["PackShards"]["Next"] == "FinishPack"
    assert plan["InputPath"] == "$.ingest" and plan["ResultPath"] == "$.pack"
    assert finish["InputPath"] == "$.pack" and finish["ResultPath"] == "$.pack" and finish.get("End") is True
    (catch,) = states["PackShards"]["Catch"]
    assert catch == {"ErrorEquals": ["States.ALL"], "ResultPath": "$.pack.packError", "Next": "FinishPack"}


def test_knobs_reach_the_map_and_the_functions() -> None:
    _, template, _ = build({"packPhotosPerShard": 250, "packMaxConcurrency": 7, "packerMemoryMb": 2048,
                            "ingestToleratedFailurePercent": 3})
    assert machine_definition(template)["States"]["PackShards"]["MaxConcurrency"] == 7
    found = functions(template)
    packer = found["lambdas.pack.packer.handler"]
    assert packer["MemorySize"] == 2048
    assert packer["Timeout"] <= 15 * 60  # Lambda's most
    for handler in ("lambdas.pack.plan.handler", "lambdas.pack.packer.handler", "lambdas.pack.finish.handler"):
        env = found[handler]["Environment"]["Variables"]
        assert env["PACK_PHOTOS_PER_SHARD"] == "250"
        assert env["INGEST_TOLERATED_FAILURE_PERCENT"] == "3"
        assert env["PACK_THREADS"] == str(PACK_THREADS)
        assert env["DATA_BUCKET"] == {"Ref": "StorageData6BB23F4E"}


def object_grants(template: Template, role: str, action: str) -> set[str]:
    return {r for s in statements_of(template, role) if action in actions(s) for r in resources(s)}


def test_each_function_reads_and_writes_only_its_prefixes(synthesized) -> None:
    _, template, _ = synthesized
    assert object_grants(template, "PackPlan", "s3:GetObject") == {f"{BUCKET}/manifests/*"}
    assert object_grants(template, "PackPlan", "s3:PutObject") == {f"{BUCKET}/reports/pack/plans/*"}
    assert object_grants(template, "PackPacker", "s3:GetObject") == {f"{BUCKET}/raw/*", f"{BUCKET}/shards/*"}
    assert object_grants(template, "PackPacker", "s3:PutObject") == {f"{BUCKET}/shards/*"}
    # ListBucket, so that a missing photo reads as 404, not 403 (S3 API reference, GetObject, "Permissions").
    assert object_grants(template, "PackPacker", "s3:ListBucket") == {BUCKET}
    assert object_grants(template, "PackFinish", "s3:GetObject") == {f"{BUCKET}/reports/pack/*"}
    assert object_grants(template, "PackFinish", "s3:PutObject") == {f"{BUCKET}/reports/pack/*"}
    # The packer deletes only a planned shard of its plan's prefix that this run left with no photo (so the prefix
    # a training job reads holds exactly the plan's packed shards); nothing else deletes.
    assert object_grants(template, "PackPacker", "s3:DeleteObject") == {f"{BUCKET}/shards/*"}
    for role in ("PackPlan", "PackPacker", "PackFinish", "Machine"):
        for statement in statements_of(template, role):
            deletes = [a for a in actions(statement) if a.startswith("s3:Delete")]
            assert not any(a in ("s3:*", "*") for a in actions(statement)), statement
            assert deletes == [] or (role == "PackPacker" and deletes == ["s3:DeleteObject"]), statement
        assert any("kms:Decrypt" in actions(s) for s in statements_of(template, role)), role


def test_state_machine_may_read_the_plan_and_write_map_results_only(synthesized) -> None:
    _, template, _ = synthesized
    statements = statements_of(template, "Machine")
    assert {r for s in statements for a in actions(s) if a.startswith("s3:") for r in resources(s)} == {
        f"{BUCKET}/reports/pack/plans/*", f"{BUCKET}/reports/pack/map-results/*"}
    invoked = {r for s in statements if "lambda:InvokeFunction" in actions(s) for r in resources(s)}
    assert any("PackPacker" in r for r in invoked)


def test_cdk_nag_reports_no_errors(synthesized) -> None:
    stack, _, _ = synthesized
    errors = Annotations.from_stack(stack).find_error("*", Match.string_like_regexp("AwsSolutions-.*"))
    assert [f"{e.id}: {e.entry.data}" for e in errors] == []


def test_the_layout_the_functions_use_is_the_storage_layout() -> None:
    assert layout.RAW_PREFIX == storage_module.RAW_PREFIX
    assert layout.MANIFEST_PREFIX == storage_module.MANIFEST_PREFIX
    assert layout.SHARD_PREFIX == storage_module.SHARD_PREFIX
    assert layout.REPORT_PREFIX.startswith(storage_module.REPORT_PREFIX)


def test_the_pipeline_packs_between_ingest_and_training_and_training_reads_the_shards(template: Template) -> None:
    (machine,) = [m for k, m in template.find_resources("AWS::StepFunctions::StateMachine").items()
                  if k.startswith("PipelineStateMachine")]
    states = definition_of(machine)["States"]
    assert states["Ingest stage"]["Next"] == "Pack stage"
    assert states["Pack stage"]["Next"] == "Training stage"
    (branch,) = states["Pack stage"]["Branches"]
    assert branch["StartAt"] == "PlanShards"
    (training,) = states["Training stage"]["Branches"]
    parameters = training["States"]["PrepareTraining"]["Parameters"]
    assert parameters["channels.$"] == "$.pack.channels" and parameters["shards.$"] == "$.pack.shards"
    # The pack failure path is the pipeline's own: caught, recorded with the stage's name, failed.
    (catch,) = states["Pack stage"]["Catch"]
    # (through the choice that words a failure with or without a cause: infra/pipeline.py)
    assert states[states[catch["Next"]]["Default"]]["Parameters"]["stage"] == "pack"
