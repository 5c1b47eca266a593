"""The ingest construct synthesized in a test stack: the Distributed Map's reader, batcher, concurrency and
failure tolerance, its wiring to the functions, least-privilege IAM, and cdk-nag."""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import Aspects
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk.assertions import Annotations, Match, Template
from cdk_nag import AwsSolutionsChecks, NagPackSuppression, NagSuppressions

from infra.config import default_context, settings_from_context
from infra.ingest import Ingest
from infra.maps import RESULT_WRITER_V2_FLAG
from infra.storage import Storage
from lambdas.ingest.worker import ITEM_FROM_PLAN
from tests.infra.conftest import definition_of, echo_input_check


def build(overrides: dict[str, Any] | None = None, *, context: dict[str, Any] | None = None):
    app = cdk.App(context=context if context is not None else default_context() | dict(overrides or {}))
    settings = settings_from_context(app.node.try_get_context)
    stack = cdk.Stack(app, "IngestTest")
    storage = Storage(stack, "Storage", settings=settings)
    ingest = Ingest(stack, "Ingest", settings=settings, data_bucket=storage.data, data_key=storage.key)
    start = sfn.Pass(stack, "Prepare", parameters={"input.$": "$$.Execution.Input", "execution.$": "$$.Execution.Name"})
    machine = sfn.StateMachine(
        stack,
        "Machine",
        definition_body=sfn.DefinitionBody.from_chainable(start.next(ingest.stage)),
        tracing_enabled=True,
        logs=sfn.LogOptions(destination=logs.LogGroup(stack, "MachineLogs"), level=sfn.LogLevel.ALL),
    )
    ingest.add_nag_evidence(machine)
    # The throwaway machine's own logging and tracing grants are the pipeline's business, not this stage's.
    NagSuppressions.add_resource_suppressions(
        machine,
        [NagPackSuppression(id="AwsSolutions-IAM5", reason="test machine: log delivery and X-Ray take '*'",
                            applies_to=["Resource::*"])],
        apply_to_children=True,
    )
    Aspects.of(app).add(AwsSolutionsChecks())
    template = Template.from_stack(stack)
    return stack, template, settings


@pytest.fixture(scope="module")
def synthesized():
    return build()


def machine_definition(template: Template) -> dict[str, Any]:
    (machine,) = template.find_resources("AWS::StepFunctions::StateMachine").values()
    return definition_of(machine)


def statements_of(template: Template, role_prefix: str) -> list[dict[str, Any]]:
    found = []
    for logical_id, policy in template.find_resources("AWS::IAM::Policy").items():
        if logical_id.startswith(role_prefix):
            found += policy["Properties"]["PolicyDocument"]["Statement"]
    return found


def actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return action if isinstance(action, list) else [action]


def resources(statement: dict[str, Any]) -> list[str]:
    """Resources as comparable text: references become their logical id, joins are concatenated."""
    resource = statement["Resource"]
    items = resource if isinstance(resource, list) else [resource]

    def text(item: Any) -> str:
        if isinstance(item, str):
            return item
        if "Fn::Join" in item:
            return "".join(text(part) for part in item["Fn::Join"][1])
        if "Ref" in item:
            return "<" + item["Ref"] + ">"
        if "Fn::GetAtt" in item:
            return "<" + ".".join(item["Fn::GetAtt"]) + ">"
        return json.dumps(item)

    return [text(item) for item in items]


def test_copy_stage_is_a_distributed_map_over_the_selection_csv(synthesized):
    _, template, settings = synthesized
    definition = machine_definition(template)
    copy = definition["States"]["CopyImages"]
    assert copy["Type"] == "Map"
    assert copy["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
    reader = copy["ItemReader"]
    assert reader["Resource"].endswith(":states:::s3:getObject")
    assert reader["ReaderConfig"] == {"InputType": "CSV", "CSVHeaderLocation": "FIRST_ROW"}
    assert reader["Parameters"]["Key.$"] == "$.ingest.selectionKey"
    assert copy["ItemBatcher"] == {"MaxItemsPerBatch": settings.ingest_batch_size}
    assert copy["MaxConcurrency"] == settings.ingest_max_concurrency == 50
    assert copy["ToleratedFailurePercentage"] == settings.ingest_tolerated_failure_percent == 5
    assert copy["ResultWriter"]["Resource"].endswith(":states:::s3:putObject")
    assert copy["ResultWriter"]["Parameters"]["Prefix"] == "reports/ingest/map-results"
    assert copy["ResultPath"] == "$.ingest.copy"
    # Each item carries what the worker reads (the same mapping the Lambda tests build batches from).
    assert copy["ItemSelector"] == {
        "image_id.$": "$$.Map.Item.Value.image_id",
        **{f"{field}.$": f"$.ingest.{key}" for field, key in ITEM_FROM_PLAN.items()},
    }


def test_knobs_reach_the_map():
    _, template, _ = build({"ingestBatchSize": 7, "ingestMaxConcurrency": 3, "ingestToleratedFailurePercent": 12})
    copy = machine_definition(template)["States"]["CopyImages"]
    assert copy["ItemBatcher"]["MaxItemsPerBatch"] == 7
    assert copy["MaxConcurrency"] == 3
    assert copy["ToleratedFailurePercentage"] == 12


def test_stage_runs_select_copy_split_and_leaves_its_result_at_ingest(synthesized):
    _, template, _ = synthesized
    states = machine_definition(template)["States"]
    select, split = states["SelectDataset"], states["SplitDataset"]
    assert states["Prepare"]["Next"] == "SelectDataset"
    assert select["Next"] == "CopyImages" and states["CopyImages"]["Next"] == "SplitDataset"
    assert select["Parameters"] == {"input.$": "$.input", "execution.$": "$.execution"}
    # The worker gets the batch itself ({"Items": [...], "BatchInput": ...}) as its event.
    batch = states["CopyImages"]["ItemProcessor"]["States"]["CopyBatch"]
    assert "Parameters" not in batch and "InputPath" not in batch
    assert select["ResultPath"] == "$.ingest" and split["ResultPath"] == "$.ingest"
    assert split["InputPath"] == "$.ingest" and "Parameters" not in split
    assert split.get("End") is True
    # A failed map still reaches the split, which writes the report before failing the stage.
    (catch,) = states["CopyImages"]["Catch"]
    assert catch == {"ErrorEquals": ["States.ALL"], "ResultPath": "$.ingest.copyError", "Next": "SplitDataset"}


def test_a_bad_request_is_not_retried_and_transient_copy_errors_are(synthesized):
    _, template, _ = synthesized
    states = machine_definition(template)["States"]
    retried = {error for rule in states["SelectDataset"].get("Retry", []) for error in rule["ErrorEquals"]}
    assert "InvalidDatasetRequest" not in retried and "States.ALL" not in retried
    assert "States.TaskFailed" not in retried
    batch = states["CopyImages"]["ItemProcessor"]["States"]["CopyBatch"]
    copy_retries = {error for rule in batch["Retry"] for error in rule["ErrorEquals"]}
    assert "TransientCopyError" in copy_retries and "States.ALL" not in copy_retries


def test_functions_run_the_ingest_handlers_with_the_deployment_defaults(synthesized):
    _, template, settings = synthesized
    functions = {
        props["Properties"]["Handler"]: props["Properties"]
        for props in template.find_resources("AWS::Lambda::Function").values()
    }
    assert set(functions) >= {"lambdas.ingest.select.handler", "lambdas.ingest.worker.handler",
                              "lambdas.ingest.split.handler"}
    env = functions["lambdas.ingest.worker.handler"]["Environment"]["Variables"]
    assert env["SOURCE_BUCKET"] == settings.source_bucket == "aft-vbi-pds"
    assert env["DATASET_SELECTOR"] == "file-list"
    assert env["DATA_BUCKET"] == {"Ref": "StorageData6BB23F4E"}
    assert functions["lambdas.ingest.worker.handler"]["Architectures"] == ["arm64"]


def test_worker_reads_only_the_source_prefixes_and_writes_only_raw(synthesized):
    _, template, _ = synthesized
    statements = statements_of(template, "IngestWorker")
    writes = [s for s in statements if "s3:PutObject" in actions(s)]
    assert writes and all(r.endswith("/raw/*") for s in writes for r in resources(s))
    reads = {r for s in statements if "s3:GetObject" in actions(s) for r in resources(s)}
    assert reads == {
        "arn:<AWS::Partition>:s3:::aft-vbi-pds/bin-images/*",
        "arn:<AWS::Partition>:s3:::aft-vbi-pds/metadata/*",
        "<StorageData6BB23F4E.Arn>/raw/*",
    }
    assert any("kms:GenerateDataKey*" in actions(s) for s in statements)


def test_no_role_gets_wildcard_s3_actions_or_the_whole_data_bucket(synthesized):
    _, template, _ = synthesized
    for prefix in ("IngestSelect", "IngestWorker", "IngestSplit", "Machine"):
        for statement in statements_of(template, prefix):
            assert not any(a in ("s3:*", "*") or a.startswith("s3:Delete") for a in actions(statement)), statement
            for resource in resources(statement):
                whole_bucket = ("StorageData6BB23F4E>/*", "StorageData6BB23F4E.Arn>/*")
                assert not resource.endswith(whole_bucket), (prefix, statement)
    listing = [s for s in statements_of(template, "IngestSelect") if "s3:ListBucket" in actions(s)]
    assert listing and listing[0]["Condition"] == {"StringLike": {"s3:prefix": ["metadata/*"]}}


def test_state_machine_may_read_the_selection_and_write_map_results_only(synthesized):
    _, template, _ = synthesized
    statements = statements_of(template, "Machine")
    s3_resources = {
        r for s in statements for a in actions(s) if a.startswith("s3:") for r in resources(s)
    }
    assert s3_resources == {
        "<StorageData6BB23F4E.Arn>/manifests/*",
        "<StorageData6BB23F4E.Arn>/reports/ingest/map-results/*",
    }
    assert any("kms:Decrypt" in actions(s) for s in statements)
    assert not any(a.endswith("*") for s in statements for a in actions(s) if a.startswith("kms:"))
    started = [s for s in statements if "states:StartExecution" in actions(s)]
    assert started, "the Distributed Map must be allowed to start its child executions"
    invoked = {r for s in statements if "lambda:InvokeFunction" in actions(s) for r in resources(s)}
    assert any("IngestWorker" in r for r in invoked)


def test_cdk_nag_reports_no_errors(synthesized):
    stack, _, _ = synthesized
    errors = Annotations.from_stack(stack).find_error("*", Match.string_like_regexp("AwsSolutions-.*"))
    assert [f"{e.id}: {e.entry.data}" for e in errors] == []


def test_missing_result_writer_flag_fails_synth_with_its_name():
    context = {k: v for k, v in default_context().items() if k != RESULT_WRITER_V2_FLAG}
    with pytest.raises(Exception, match="useDistributedMapResultWriterV2"):
        build(context=context)


def test_stage_runs_inside_the_pipeline_with_its_grants():
    from infra.pipeline import Pipeline, Stage

    app = cdk.App(context=default_context())
    settings = settings_from_context(app.node.try_get_context)
    stack = cdk.Stack(app, "PipelineWithIngest")
    storage = Storage(stack, "Storage", settings=settings)
    ingest = Ingest(stack, "Ingest", settings=settings, data_bucket=storage.data, data_key=storage.key)
    check = echo_input_check(stack)
    Pipeline(stack, "Pipeline", settings=settings, stages=[Stage("ingest", ingest.stage)], input_check=check)
    # No grant call: the map's reader and writer register their S3 and KMS grants themselves.
    template = Template.from_stack(stack)

    (branch,) = machine_definition(template)["States"]["Ingest stage"]["Branches"]
    assert branch["StartAt"] == "SelectDataset"
    assert branch["States"]["CopyImages"]["ItemProcessor"]["ProcessorConfig"]["Mode"] == "DISTRIBUTED"
    statements = [s for prefix in ("Pipeline",) for s in statements_of(template, prefix)]
    assert any("states:StartExecution" in actions(s) for s in statements)
    kms = {a: resources(s) for s in statements for a in actions(s) if a.startswith("kms:")}
    key = ["<StorageDataKeyE15BA43B.Arn>"]
    assert kms == {"kms:Decrypt": key, "kms:GenerateDataKey": key}
    assert {r for s in statements for a in actions(s) if a.startswith("s3:") for r in resources(s)} == {
        "<StorageData6BB23F4E.Arn>/manifests/*",
        "<StorageData6BB23F4E.Arn>/reports/ingest/map-results/*",
    }
