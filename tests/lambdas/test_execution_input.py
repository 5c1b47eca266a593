"""The execution-input schema and the pipeline's first state, in-process (the state itself runs in
tests/pipeline/test_execution.py). What these rely on from AWS: Step Functions carries at most 262,144 bytes per
state and StartExecution accepts an input of that size; ``States.ALL`` does not catch ``States.DataLimitExceeded``
(Step Functions developer guide, "Error names"); Lambda's error document for an unhandled exception is
``{"errorType", "errorMessage", "stackTrace"}``, which becomes the failed state's cause."""

from __future__ import annotations

import json
import traceback
from typing import Any

import pytest

from infra.config import load_settings
from infra.execution_input import allowances as allowances_from
from lambdas.execution_input import check as first_state
from lambdas.execution_input import docs
from lambdas.execution_input.schema import (
    MAX_INPUT_BYTES,
    STATE_PAYLOAD_LIMIT_BYTES,
    Allowances,
    ExecutionInput,
    InvalidExecutionInput,
    check,
)
from lambdas.ingest.request import DatasetRequest, run_id_from
from lambdas.training.request import TrainingInput
from tests.lambdas.test_training import BUCKET, deployment

DATASET_DEFAULTS = {"DATASET_SELECTOR": "file-list", "SOURCE_BUCKET": "aft-vbi-pds",
                    "SPLIT_VALIDATION_FRACTION": "0.1", "SPLIT_TEST_FRACTION": "0.1"}
DEFAULT_ALLOWANCES = Allowances.model_validate(allowances_from(load_settings()))
PERMISSIVE = Allowances.model_validate(allowances_from(load_settings({
    "allowNetworkIsolationOff": True, "allowForceDeploy": True, "trainingMaxInstanceCount": 100,
    "trainingAllowedInstanceTypes": ["ml.g4dn.xlarge", "ml.p5.48xlarge"], "tuningMaxJobsCap": 500,
    "tuningMaxParallelJobsCap": 100})))


def checked(raw: Any, allowances: Allowances = DEFAULT_ALLOWANCES, environ: dict[str, str] | None = None,
            **changes: Any) -> dict[str, Any]:
    return check(raw, allowances=allowances, deployment=deployment(**changes),
                 environ=DATASET_DEFAULTS if environ is None else environ)


def refusal(raw: Any, allowances: Allowances = DEFAULT_ALLOWANCES, **kwargs: Any) -> str:
    with pytest.raises(InvalidExecutionInput) as caught:
        checked(raw, allowances, **kwargs)
    return str(caught.value)


# --- strict types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "field"), [
    ({"dataset": {"selector": "count-range", "minCount": "3"}}, "dataset.minCount"),
    ({"dataset": {"selector": "count-range", "minCount": True}}, "dataset.minCount"),
    ({"dataset": {"limit": "10"}}, "dataset.limit"),
    ({"dataset": {"limit": 10.0}}, "dataset.limit"),
    ({"training": {"instanceCount": "2"}}, "training.instanceCount"),
    ({"training": {"useSpot": "true"}}, "training.useSpot"),
    ({"training": {"tuning": {"maxJobs": "4"}}}, "training.tuning.maxJobs"),
    ({"deploy": {"force": "true"}}, "deploy.force"),
    ({"deploy": {"force": 1}}, "deploy.force"),
    ({"deploy": {"minImprovement": "a lot"}}, "deploy.minImprovement"),
])
def test_a_value_of_the_wrong_json_type_is_refused_naming_its_field(raw: dict[str, Any], field: str) -> None:
    message = refusal(raw)
    assert message.startswith(f"invalid execution input: {field}: "), message


def test_a_section_that_is_not_an_object_is_refused_readably() -> None:
    message = refusal({"deploy": "force"})
    assert message.startswith("invalid execution input: deploy: Input should be"), message
    assert "'str' object" not in message
    assert refusal({"dataset": [1, 2]}).startswith("invalid execution input: dataset: ")


@pytest.mark.parametrize("raw", [[], "run", 3, True])
def test_an_input_that_is_not_an_object_is_refused(raw: Any) -> None:
    assert refusal(raw).startswith("invalid execution input: input: expected a JSON object")


def test_an_empty_or_null_input_means_every_default() -> None:
    assert checked({}) == {}
    assert checked(None) == {}


def test_numbers_keep_their_json_meaning_where_a_float_is_expected() -> None:
    # JSON has one number type: 0 is a valid fraction, and a bound of 0 for minImprovement.
    normalized = checked({"dataset": {"validationFraction": 0.2, "testFraction": 0}, "deploy": {"minImprovement": 0}})
    assert normalized == {"dataset": {"validationFraction": 0.2, "testFraction": 0}, "deploy": {"minImprovement": 0}}


# --- unknown keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "where", "hint"), [
    ({"datset": {}}, "datset", "did you mean dataset?"),
    ({"dataset": {"limt": 5}}, "dataset.limt", "did you mean limit?"),
    ({"training": {"instanceTyp": "ml.g4dn.xlarge"}}, "training.instanceTyp", "did you mean instanceType?"),
    ({"training": {"tuning": {"maxJob": 3}}}, "training.tuning.maxJob", "did you mean maxJobs?"),
    ({"deploy": {"forse": True}}, "deploy.forse", "did you mean force?"),
    ({"zzz": 1}, "zzz", "expected one of dataset, training, deploy"),
])
def test_an_unknown_key_at_any_level_is_refused_with_a_did_you_mean(raw: dict[str, Any], where: str,
                                                                     hint: str) -> None:
    assert refusal(raw) == f"invalid execution input: {where}: unknown key; {hint}"


def test_a_top_level_typo_no_longer_starts_the_default_run() -> None:
    # Before: {"datset": {...}} was ignored and the 10,441-photo default ran.
    assert "datset: unknown key; did you mean dataset?" in refusal({"datset": {"limit": 10}})


# --- causes: short, naming the field, never echoing ----------------------------------------------------


def test_an_oversized_input_is_refused_by_size_naming_its_largest_section_without_echoing_it() -> None:
    huge = "x" * (STATE_PAYLOAD_LIMIT_BYTES - 3000)  # 259 KB: StartExecution accepts it
    message = refusal({"training": {"pretrained": huge}, "dataset": {"limit": 5}})
    assert message.startswith("invalid execution input: input: ")
    assert f"above the {MAX_INPUT_BYTES} bytes" in message and "largest section is training" in message
    assert "xxxxxxxxxx" not in message and len(message) < 400


def test_an_input_just_under_the_bound_is_accepted() -> None:
    seed = "s" * (MAX_INPUT_BYTES - 100)
    assert checked({"dataset": {"seed": seed}})["dataset"]["seed"] == seed


@pytest.mark.parametrize("raw", [
    {"dataset": {"manifestUri": "s3://" + "b" * 5000}},
    {"k" * 5000: 1},
    {"training": {"hyperparameters": {"h" * 3000: [1] * 500}}},
    {f"unknown{i}": i for i in range(300)},
    {"training": {"pretrained": "p" * 9000, "instanceType": "ml.zzz.xlarge"}},
])
def test_every_cause_is_short_and_echoes_no_long_value(raw: dict[str, Any]) -> None:
    message = refusal(raw)
    assert len(message) < 700, message
    assert "b" * 60 not in message and "k" * 60 not in message and "h" * 60 not in message
    assert "p" * 60 not in message


def test_the_lambda_error_document_that_becomes_the_cause_stays_under_1000_characters(monkeypatch) -> None:
    # The worst case: many problems, each with a long key; the handler raises from its own frame only.
    monkeypatch.setenv(first_state.ALLOWANCES_ENV, DEFAULT_ALLOWANCES.model_dump_json(by_alias=True))
    monkeypatch.setenv(first_state.DEPLOYMENT_ENV, deployment().model_dump_json(by_alias=True))
    for name, value in DATASET_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    raw = {"dataset": {f"{'q' * 35}{i}": "v" * 900 for i in range(8)}, "training": {"instanceCount": "x" * 900}}
    with pytest.raises(InvalidExecutionInput) as caught:
        first_state.handler(raw, None)
    document = json.dumps({"errorType": type(caught.value).__name__, "errorMessage": str(caught.value),
                           "requestId": "00000000-0000-0000-0000-000000000000",
                           "stackTrace": traceback.format_tb(caught.value.__traceback__)})
    assert len(document) < 1000, document
    # Raised from the handler's own frame: nothing below it (schema, pydantic) reaches the trace.
    assert traceback.extract_tb(caught.value.__traceback__)[-1].name == "handler"
    assert "dataset." in str(caught.value)


# --- the stages' own cross-field rules, at the door --------------------------------------------------------


@pytest.mark.parametrize(("raw", "start"), [
    ({"dataset": {"minCount": 1}}, "dataset.minCount only applies to selector 'count-range'"),
    ({"dataset": {"validationFraction": 0.5, "testFraction": 0.45}}, "dataset.validationFraction + testFraction"),
    ({"dataset": {"sourceBucket": "someone-elses"}}, "dataset.sourceBucket 'someone-elses' cannot be read"),
    ({"training": {"useSpot": True, "maxRuntimeSeconds": 7200, "maxWaitSeconds": 3600}}, "training.maxWaitSeconds"),
    ({"training": {"epochs": 0}}, "training.epochs"),
    ({"training": {"instanceType": "ml.zzz.xlarge"}}, "training.instanceType"),
    ({"training": {"tuning": {"enabled": True, "maxJobs": 2, "maxParallelJobs": 3}}},
     "training.tuning.maxParallelJobs"),
    ({"training": {"pretrained": "s3://elsewhere/w.pth"}}, "training.pretrained"),
])
def test_what_a_stage_would_refuse_later_is_refused_at_the_door(raw: dict[str, Any], start: str) -> None:
    assert refusal(raw, PERMISSIVE).startswith(f"invalid execution input: {start}"), refusal(raw, PERMISSIVE)


def test_the_normalized_input_is_camel_case_and_holds_only_what_was_given() -> None:
    raw = {"dataset": {"selector": "count-range", "min_count": 1, "maxCount": None},
           "training": {"tuning": {"enabled": True, "batchSizes": [16, 32]}}, "deploy": {}}
    assert checked(raw) == {"dataset": {"selector": "count-range", "minCount": 1},
                            "training": {"hyperparameters": {}, "tuning": {"enabled": True, "batchSizes": [16, 32]}},
                            "deploy": {}}


def test_the_stages_read_the_normalized_input_with_the_models_that_checked_it() -> None:
    normalized = checked({"dataset": {"limit": 10}, "training": {"epochs": 3}, "deploy": {"minImprovement": 0.02}})
    assert DatasetRequest.model_validate(normalized["dataset"]).limit == 10
    assert TrainingInput.model_validate(normalized["training"]).epochs == 3
    # One source: the schema's sections are the stages' own models, not copies.
    fields = ExecutionInput.model_fields
    assert DatasetRequest in typing_args(fields["dataset"].annotation)
    assert TrainingInput in typing_args(fields["training"].annotation)


def typing_args(annotation: Any) -> tuple[Any, ...]:
    import typing
    return typing.get_args(annotation)


# --- the controls no input can switch off (#23 item 3) --------------------------------------------------


@pytest.mark.parametrize(("raw", "field", "knob"), [
    ({"training": {"networkIsolation": False}}, "training.networkIsolation", "allowNetworkIsolationOff=true"),
    ({"training": {"instanceType": "ml.p5.48xlarge"}}, "training.instanceType", "trainingAllowedInstanceTypes"),
    ({"training": {"instanceCount": 100}}, "training.instanceCount", "trainingMaxInstanceCount=100"),
    ({"training": {"maxRuntimeSeconds": 28 * 24 * 3600, "useSpot": False}}, "training.maxRuntimeSeconds",
     "trainingMaxSeconds=2419200"),
    ({"training": {"tuning": {"enabled": True, "maxJobs": 500}}}, "training.tuning.maxJobs", "tuningMaxJobsCap=500"),
    ({"training": {"tuning": {"enabled": True, "maxJobs": 8, "maxParallelJobs": 8}}},
     "training.tuning.maxParallelJobs", "tuningMaxParallelJobsCap=8"),
    ({"deploy": {"force": True}}, "deploy.force", "allowForceDeploy=true"),
])
def test_a_control_is_refused_by_default_naming_the_field_and_the_context_key(raw: dict[str, Any], field: str,
                                                                             knob: str) -> None:
    message = refusal(raw)
    assert message.startswith(f"invalid execution input: {field}: "), message
    assert f"-c {knob}" in message, message


@pytest.mark.parametrize("raw", [
    {"training": {"networkIsolation": False}},
    {"training": {"instanceType": "ml.p5.48xlarge"}},
    {"training": {"instanceCount": 100}},
    {"training": {"tuning": {"enabled": True, "maxJobs": 500, "maxParallelJobs": 100}}},
    {"deploy": {"force": True}},
])
def test_the_same_input_is_accepted_where_the_stack_allows_it(raw: dict[str, Any]) -> None:
    assert checked(raw, PERMISSIVE) == json.loads(json.dumps(raw)) | (
        {"training": {"hyperparameters": {}, **raw["training"]}} if "training" in raw else {})


def test_isolation_on_and_the_default_instance_type_need_no_allowance() -> None:
    assert checked({"training": {"networkIsolation": True, "instanceType": "ml.g4dn.xlarge", "instanceCount": 2}})


# --- run ids -----------------------------------------------------------------------------------------


def test_distinct_execution_names_get_distinct_run_ids() -> None:
    names = ["exp-1", "exp+1", "exp@1", "expü1", "exp 1", "exp_1", "exp.1", "-exp-1-", "exp--1", "exp=1"]
    ids = [run_id_from(name, "now") for name in names]
    assert len(set(ids)) == len(names), ids
    assert all(run_id.startswith("exp") for run_id in ids[:4])
    assert run_id_from("exp-1", "now") == run_id_from("arn:aws:states:us-east-1:1:execution:m:exp-1", "now")
    assert all(len(run_id_from(name * 20, "now")) <= 80 for name in names)
    assert run_id_from("@@@", "now").startswith("run-")


# --- the document ------------------------------------------------------------------------------------


def test_the_committed_document_is_what_the_schema_generates() -> None:
    assert docs.DOCUMENT.read_text() == docs.render(), (
        "docs/execution-input.md is out of date: run .venv/bin/python -m lambdas.execution_input.docs")


def test_every_key_of_the_schema_has_a_meaning_in_the_document() -> None:
    missing = [path for path in docs.paths() if path not in docs.MEANINGS]
    assert missing == []
    assert "dataset.minCount" in docs.paths() and "training.tuning.maxJobs" in docs.paths()


def test_the_document_lists_every_allowance_the_function_reads() -> None:
    documented = {key for key, _ in docs.ALLOWANCES}
    assert documented == set(allowances_from(load_settings())), documented
    assert BUCKET  # the deployment the checks run against is the training tests' own
