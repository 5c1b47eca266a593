"""Ingest functions against moto: a fake ``aft-vbi-pds`` seeded with the real sample, run select -> copy
batches (shaped as the Distributed Map passes them) -> split, the way the state machine chains them."""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lambdas.ingest import aws, select, split, worker
from lambdas.ingest.request import InvalidDatasetRequest, run_id_from
from ml import abid

SOURCE = "aft-vbi-pds"
DATA = ""  # set per test by the s3 fixture
BATCH = 25


@dataclass
class FakeContext:
    function_name: str = "ingest-test"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:ingest-test"
    memory_limit_in_mb: int = 512
    aws_request_id: str = "00000000-0000-0000-0000-000000000000"
    log_group_name: str = "/aws/lambda/ingest-test"
    log_stream_name: str = "test"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


CONTEXT = FakeContext()


def sample_labels(sample_dir: Path) -> dict[str, int]:
    with open(sample_dir / "labels.csv") as handle:
        return {row["image_id"]: int(row["expected_quantity"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def moto_source(sample_dir: Path):
    """One moto session per module: the fake public bucket is seeded once (480 objects); tests that change
    it put the original back."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=SOURCE)
        for folder in (abid.IMAGE_DIR, abid.METADATA_DIR):
            for path in sorted((sample_dir / folder).iterdir()):
                client.put_object(Bucket=SOURCE, Key=f"{folder}/{path.name}", Body=path.read_bytes())
        key_id = boto3.client("kms", region_name="us-east-1").create_key()["KeyMetadata"]["KeyId"]
        yield client, key_id


@pytest.fixture
def s3(moto_source, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A fresh, KMS-encrypted data bucket per test, and the functions' environment pointing at it."""
    global DATA
    client, key_id = moto_source
    DATA = f"data-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=DATA)
    client.put_bucket_versioning(Bucket=DATA, VersioningConfiguration={"Status": "Enabled"})
    client.put_bucket_encryption(
        Bucket=DATA,
        ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": {
            "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_id}, "BucketKeyEnabled": True}]},
    )
    for name, value in {
        "DATA_BUCKET": DATA, "SOURCE_BUCKET": SOURCE, "DATASET_SELECTOR": "file-list",
        "SPLIT_VALIDATION_FRACTION": "0.1", "SPLIT_TEST_FRACTION": "0.1",
        "INGEST_TOLERATED_FAILURE_PERCENT": "5", "INGEST_WORKER_THREADS": "4", "POWERTOOLS_SERVICE_NAME": "ingest",
    }.items():
        monkeypatch.setenv(name, value)
    aws.s3.cache_clear()
    yield client
    aws.s3.cache_clear()


@pytest.fixture
def restore_source(moto_source, sample_dir: Path):
    """Puts every sample object a test changed or deleted back into the fake public bucket afterwards."""
    client, _ = moto_source
    changed: list[str] = []
    yield changed.append
    for key in changed:
        client.put_object(Bucket=SOURCE, Key=key, Body=(sample_dir / key).read_bytes())


def upload_list(s3, ids: list[str], key: str = "manifests/user/sample.csv") -> str:
    s3.put_object(Bucket=DATA, Key=key, Body=("image_id\n" + "\n".join(ids) + "\n").encode())
    return f"s3://{DATA}/{key}"


def run_copy_map(s3, plan: dict[str, Any], *, batch_size: int = BATCH, fail_batches: set[int] = frozenset()):
    """Do what the Distributed Map does: read the selection CSV (header row), apply the ItemSelector, batch,
    invoke the worker per batch, and export results as ResultWriter does (manifest.json + status files)."""
    text = s3.get_object(Bucket=DATA, Key=plan["selectionKey"])["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    items = [
        {"image_id": row["image_id"], **{field: plan[key] for field, key in worker.ITEM_FROM_PLAN.items()}}
        for row in rows
    ]
    succeeded, failed = [], []
    for number, start in enumerate(range(0, len(items), batch_size)):
        batch = {"Items": items[start : start + batch_size], "BatchInput": {}}
        arn = f"arn:aws:states:us-east-1:123456789012:execution:ingest/Map:{uuid.uuid4()}"
        if number in fail_batches:
            failed.append({"ExecutionArn": arn, "Input": json.dumps(batch), "Status": "FAILED",
                           "Error": "Lambda.Unknown", "Cause": "The function timed out after 300 seconds"})
            continue
        output = worker.handler(batch, CONTEXT)
        succeeded.append({"ExecutionArn": arn, "Input": json.dumps(batch), "Output": json.dumps(output),
                          "Status": "SUCCEEDED"})
    run = uuid.uuid4()
    prefix = f"reports/ingest/map-results/{run}"
    files: dict[str, list] = {"SUCCEEDED": [], "FAILED": [], "PENDING": []}
    for status, entries in (("SUCCEEDED", succeeded), ("FAILED", failed)):
        if entries:
            key = f"{prefix}/{status}_0.json"
            s3.put_object(Bucket=DATA, Key=key, Body=json.dumps(entries).encode())
            files[status].append({"Key": key, "Size": 0})
    manifest_key = f"{prefix}/manifest.json"
    s3.put_object(Bucket=DATA, Key=manifest_key, Body=json.dumps(
        {"DestinationBucket": DATA, "MapRunArn": f"arn:aws:states:::mapRun:{run}", "ResultFiles": files}).encode())
    outputs = [json.loads(entry["Output"]) for entry in succeeded]
    return {"MapRunArn": f"arn:aws:states:::mapRun:{run}",
            "ResultWriterDetails": {"Bucket": DATA, "Key": manifest_key}}, outputs


def ingest(s3, dataset: dict[str, Any] | None, execution: str, **map_options):
    """select -> copy map -> split with the state passing of infra/ingest.py ($.ingest, then $.ingest.copy)."""
    execution_input = {} if dataset is None else {"dataset": dataset}
    plan = select.handler({"input": execution_input, "execution": execution}, CONTEXT)
    copy, outputs = run_copy_map(s3, plan, **map_options)
    result = split.handler({**plan, "copy": copy}, CONTEXT)
    return plan, outputs, result


def read_json(s3, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=DATA, Key=key)["Body"].read())


def totals(outputs: list[dict]) -> dict[str, int]:
    return {name: sum(o[name] for o in outputs) for name in ("copied", "unchanged", "filtered")}


def test_sample_is_ingested_copied_and_split_into_training_channels(s3, sample_dir):
    labels = sample_labels(sample_dir)
    uri = upload_list(s3, sorted(labels))

    plan, outputs, result = ingest(s3, {"selector": "manifest", "manifestUri": uri}, "run-1")

    assert plan["selected"] == 240
    assert totals(outputs) == {"copied": 480, "unchanged": 0, "filtered": 0}
    run = run_id_from("run-1", "unused")  # the execution name plus a digest of it
    assert result["runId"] == run and run.startswith("run-1-")
    assert result["recordsKey"] == f"manifests/{run}/records.jsonl"
    assert result["reportKey"] == f"reports/ingest/{run}.json"
    assert set(result["channels"]) == {"train", "validation", "test"}
    assert sum(result["counts"].values()) == 240
    # Labels come from the copied metadata, identical to the dataset's own labels file.
    records = abid.parse_records_jsonl(s3.get_object(Bucket=DATA, Key=result["recordsKey"])["Body"].read().decode())
    assert {r.image_id: r.quantity for r in records} == labels
    # Stratified: each count class is in every split in proportion (20 empty bins -> 2 validation, 2 test).
    validation = read_json(s3, f"manifests/{run}/validation.manifest")
    assert validation[0] == {"prefix": f"s3://{DATA}/raw/"}
    val_ids = {abid.image_id_from_key(k) for k in validation[1:]}
    assert sum(1 for i in val_ids if labels[i] == 0) == 2
    # Classes above 5 are too small to give 10 % each, so they stay in train: 196 / 22 / 22.
    assert result["counts"] == {"train": 196, "validation": 22, "test": 22}
    # Server-side copies into raw/, in the bucket's KMS encryption.
    head = s3.head_object(Bucket=DATA, Key="raw/bin-images/01046.jpg")
    assert head["ContentLength"] == (sample_dir / "bin-images" / "01046.jpg").stat().st_size
    assert head.get("ServerSideEncryption") == "aws:kms"
    report = read_json(s3, result["reportKey"])
    assert report["failed"] == 0 and report["failures"] == [] and report["ingested"] == 240


def test_channel_manifest_materializes_to_a_folder_that_ml_reads(s3, sample_dir, tmp_path):
    labels = sample_labels(sample_dir)
    _, _, result = ingest(s3, {"selector": "manifest", "manifestUri": upload_list(s3, sorted(labels))}, "run-ml")
    # What SageMaker does with a ManifestFile channel: every key, relative to the prefix, lands in the channel.
    manifest = read_json(s3, f"manifests/{run_id_from('run-ml', '')}/train.manifest")
    prefix = manifest[0]["prefix"].removeprefix(f"s3://{DATA}/")
    for key in manifest[1:]:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(s3.get_object(Bucket=DATA, Key=prefix + key)["Body"].read())
    records, rejected = abid.scan_folder(tmp_path)
    assert rejected == []
    assert len(records) == result["counts"]["train"]
    records_key = f"manifests/{run_id_from('run-ml', '')}/train.jsonl"
    expected = s3.get_object(Bucket=DATA, Key=records_key)["Body"].read().decode()
    assert records == abid.parse_records_jsonl(expected)


def test_rerun_copies_zero_objects(s3, sample_dir):
    uri = upload_list(s3, sorted(sample_labels(sample_dir))[::4])
    request = {"selector": "manifest", "manifestUri": uri}
    ingest(s3, request, "first")
    versions_before = len(s3.list_object_versions(Bucket=DATA, Prefix="raw/").get("Versions", []))

    _, outputs, result = ingest(s3, request, "second")

    assert totals(outputs) == {"copied": 0, "unchanged": 120, "filtered": 0}
    assert len(s3.list_object_versions(Bucket=DATA, Prefix="raw/").get("Versions", [])) == versions_before
    assert read_json(s3, result["reportKey"])["objectsCopied"] == 0


def test_changed_source_object_is_copied_again(s3, sample_dir, restore_source):
    restore_source("bin-images/01046.jpg")
    uri = upload_list(s3, ["01046", "01062"])
    ingest(s3, {"selector": "manifest", "manifestUri": uri, "validationFraction": 0.01, "testFraction": 0.0},
           "first")
    s3.put_object(Bucket=SOURCE, Key="bin-images/01046.jpg", Body=b"\xff\xd8\xff new photo")

    _, outputs, _ = ingest(s3, {"selector": "manifest", "manifestUri": uri, "validationFraction": 0.01,
                                "testFraction": 0.0}, "second")

    assert totals(outputs) == {"copied": 1, "unchanged": 3, "filtered": 0}
    assert s3.get_object(Bucket=DATA, Key="raw/bin-images/01046.jpg")["Body"].read() == b"\xff\xd8\xff new photo"


def test_missing_and_corrupt_objects_are_reported_while_the_rest_succeed(s3, sample_dir, monkeypatch,
                                                                          restore_source):
    monkeypatch.setenv("INGEST_TOLERATED_FAILURE_PERCENT", "10")
    labels = {i: q for n, (i, q) in enumerate(sorted(sample_labels(sample_dir).items())) if n % 3 == 0 or
              i in ("01062", "01117", "01129")}
    for key in ("bin-images/01062.jpg", "metadata/01117.json", "metadata/01129.json"):
        restore_source(key)
    s3.delete_object(Bucket=SOURCE, Key="bin-images/01062.jpg")
    s3.put_object(Bucket=SOURCE, Key="metadata/01117.json", Body=b'{"EXPECTED_QUANTITY": ')
    s3.put_object(Bucket=SOURCE, Key="metadata/01129.json", Body=b'{"EXPECTED_QUANTITY": -3}')
    uri = upload_list(s3, [*sorted(labels), "99999"])

    plan, _, result = ingest(s3, {"selector": "manifest", "manifestUri": uri}, "with-failures")

    report = read_json(s3, result["reportKey"])
    reasons = {f["imageId"]: f["reason"] for f in report["failures"]}
    assert set(reasons) == {"01062", "01117", "01129", "99999"}
    assert "bin-images/01062.jpg does not exist" in reasons["01062"]
    assert "corrupt metadata" in reasons["01117"] and "not valid JSON" in reasons["01117"]
    assert "EXPECTED_QUANTITY" in reasons["01129"]
    assert "metadata/99999.json does not exist" in reasons["99999"]
    assert report["ingested"] == len(labels) - 3 and plan["selected"] == len(labels) + 1
    assert sum(result["counts"].values()) == len(labels) - 3
    listed = set()
    for name in ("train", "validation", "test"):
        manifest = f"manifests/{run_id_from('with-failures', '')}/{name}.manifest"
        listed |= {abid.image_id_from_key(k) for k in read_json(s3, manifest)[1:]}
    assert listed.isdisjoint(reasons)
    # A corrupt pair is not copied: raw/ holds only what training can use.
    assert "Contents" not in s3.list_objects_v2(Bucket=DATA, Prefix="raw/metadata/01117.json")


def test_failed_batch_reports_each_of_its_images_with_the_error(s3, sample_dir, monkeypatch):
    monkeypatch.setenv("INGEST_TOLERATED_FAILURE_PERCENT", "20")
    uri = upload_list(s3, sorted(sample_labels(sample_dir)))

    _, _, result = ingest(s3, {"selector": "manifest", "manifestUri": uri}, "batch-failed", fail_batches={1})

    report = read_json(s3, result["reportKey"])
    assert report["failed"] == BATCH and report["failedBatches"] == 1
    assert all("timed out" in f["reason"] for f in report["failures"])
    assert report["ingested"] == 240 - BATCH


def test_too_many_failures_fail_the_step_after_writing_the_report(s3, sample_dir):
    uri = upload_list(s3, [*sorted(sample_labels(sample_dir))[:20], *(f"9{n:04d}" for n in range(5))])
    with pytest.raises(split.TooManyFailures, match=r"5 of 25 images failed \(20.0 %\).*reports/ingest/too-many-"):
        ingest(s3, {"selector": "manifest", "manifestUri": uri}, "too-many")
    assert read_json(s3, f"reports/ingest/{run_id_from('too-many', '')}.json")["failed"] == 5


def test_a_failed_copy_map_still_reports_every_selected_image(s3):
    uri = upload_list(s3, ["01046", "01062", "01117"])
    plan = select.handler({"input": {"dataset": {"selector": "manifest", "manifestUri": uri}},
                           "execution": "map-failed"}, CONTEXT)
    error = {"Error": "States.ExceedToleratedFailureThreshold", "Cause": "The specified tolerated failure threshold "
             "was exceeded"}
    with pytest.raises(split.CopyMapFailed,
                       match=r"ExceedToleratedFailureThreshold.*reports/ingest/map-failed-[0-9a-f]{10}\.json"):
        split.handler({**plan, "copyError": error}, CONTEXT)
    report = read_json(s3, f"reports/ingest/{run_id_from('map-failed', '')}.json")
    assert [f["imageId"] for f in report["failures"]] == sorted(f["imageId"] for f in report["failures"])
    assert {f["imageId"] for f in report["failures"]} == {"01046", "01062", "01117"}
    assert all("tolerated failure threshold" in f["reason"] for f in report["failures"])


def test_count_range_scans_the_metadata_and_copies_only_images_in_range(s3, sample_dir):
    labels = sample_labels(sample_dir)
    wanted = {i for i, q in labels.items() if 1 <= q <= 2}

    plan, outputs, result = ingest(s3, {"selector": "count-range", "minCount": 1, "maxCount": 2}, "range")

    assert plan["selected"] == 240  # every metadata document of the source is a candidate
    assert totals(outputs)["filtered"] == 240 - len(wanted)
    records = abid.parse_records_jsonl(s3.get_object(Bucket=DATA, Key=result["recordsKey"])["Body"].read().decode())
    assert {r.image_id for r in records} == wanted
    copied = {abid.image_id_from_key(o["Key"]) for o in s3.list_objects_v2(Bucket=DATA, Prefix="raw/")["Contents"]}
    assert copied == wanted


def test_count_range_lists_the_source_page_by_page(s3):
    pages = []
    s3.meta.events.register("after-call.s3.ListObjectsV2", lambda parsed, **_: pages.append(parsed["KeyCount"]))
    try:
        ids = list(select.listed_metadata_ids(s3, SOURCE, page_size=100))
    finally:
        s3.meta.events.unregister("after-call.s3.ListObjectsV2")
    assert len(ids) == 240 and ids == sorted(ids)
    assert pages == [100, 100, 40]  # one page at a time, never everything in one call


def test_default_request_selects_the_classic_10441_list(s3):
    plan = select.handler({"input": {}, "execution": "defaults"}, CONTEXT)
    assert plan["selector"] == "file-list" and plan["sourceBucket"] == SOURCE
    assert plan["selected"] == 10441
    selection = f"manifests/{run_id_from('defaults', '')}/selection.csv"
    text = s3.get_object(Bucket=DATA, Key=selection)["Body"].read().decode()
    lines = text.splitlines()
    assert lines[0] == "image_id" and len(lines) == 10442
    assert "100313" in lines and len(set(lines)) == 10442


def test_limit_takes_a_repeatable_sample_that_depends_on_the_seed(s3):
    def chosen(execution: str, **extra) -> list[str]:
        plan = select.handler({"input": {"dataset": {"limit": 50, **extra}}, "execution": execution}, CONTEXT)
        return s3.get_object(Bucket=DATA, Key=plan["selectionKey"])["Body"].read().decode().splitlines()[1:]

    first, again, other = chosen("a"), chosen("b"), chosen("c", seed=7)
    assert len(first) == 50 and first == again and first != other
    # Not the 50 lowest ids: the hash order spreads a cheap run over the whole list.
    assert sorted(first) != sorted(select.file_list_ids())[:50]


@pytest.mark.parametrize(("split_name", "expected"), [("train", 324735), ("validation", 36032), ("all", 360767)])
def test_challenge_selector_uses_the_shipped_split(s3, split_name, expected):
    plan = select.handler(
        {"input": {"dataset": {"selector": "challenge", "challengeSplit": split_name}}, "execution": split_name},
        CONTEXT,
    )
    assert plan["selected"] == expected and plan["challengeSplit"] == split_name


@pytest.mark.parametrize(
    ("dataset", "field"),
    [
        ({"selector": "everything"}, "selector"),
        ({"selector": "all", "minCount": 1}, "minCount"),  # all means any count: bounds belong to count-range
        ({"selector": "all", "challengeSplit": "all"}, "challengeSplit"),
        ({"selector": "challenge", "challengeSplit": "test"}, "challengeSplit"),
        ({"selector": "count-range", "minCount": -1}, "minCount"),
        ({"selector": "count-range", "minCount": 4, "maxCount": 2}, "minCount"),
        ({"selector": "manifest"}, "manifestUri"),
        ({"selector": "manifest", "manifestUri": "https://example.com/list.csv"}, "manifestUri"),
        ({"selector": "file-list", "minCount": 1}, "minCount"),
        ({"limit": 0}, "limit"),
        ({"validationFraction": 0.5, "testFraction": 0.45}, "testFraction"),
        ({"sourceBucket": "Not_A_Bucket"}, "sourceBucket"),
        ({"selecter": "file-list"}, "selecter"),
        ({"minCount": 1}, "minCount"),  # the default selector is file-list
        ("file-list", "input.dataset"),
    ],
)
def test_invalid_request_fails_with_a_message_naming_the_field(s3, dataset, field):
    with pytest.raises(InvalidDatasetRequest, match=field):
        select.handler({"input": {"dataset": dataset}, "execution": "bad"}, CONTEXT)
    assert "Contents" not in s3.list_objects_v2(Bucket=DATA, Prefix="manifests/bad")


def test_user_manifest_outside_the_manifests_prefix_is_refused(s3):
    with pytest.raises(InvalidDatasetRequest, match="manifestUri must be under"):
        select.handler({"input": {"dataset": {"selector": "manifest", "manifestUri": "s3://elsewhere/list.csv"}},
                        "execution": "x"}, CONTEXT)
    with pytest.raises(InvalidDatasetRequest, match="does not exist"):
        select.handler({"input": {"dataset": {"selector": "manifest",
                                              "manifestUri": f"s3://{DATA}/manifests/none.csv"}},
                        "execution": "x"}, CONTEXT)


def test_user_lists_accept_ids_keys_json_and_sagemaker_manifests():
    assert abid.parse_id_list("image_id\n01046\nbin-images/01062.jpg\n\nmetadata/01046.json\n") == ["01046", "01062"]
    assert abid.parse_id_list('[{"prefix": "s3://b/raw/"}, "bin-images/01046.jpg", "metadata/01046.json"]') == [
        "01046"]
    assert abid.parse_id_list('{"image_id": "01046", "quantity": 3, "n_asins": 2}\n') == ["01046"]
    with pytest.raises(ValueError, match="is not an ABID image id"):
        abid.parse_id_list("01046\nbin images/01 062?.jpg\n")


class _FlakyS3:
    """An S3 client whose every call answers 503: a worker must raise for a retry, not report 'missing'."""

    def __getattr__(self, name):
        from botocore.exceptions import ClientError

        def fail(**kwargs):
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "slow down"}}, name)

        return fail


def test_worker_raises_a_retryable_error_when_s3_itself_fails():
    with pytest.raises(worker.TransientCopyError, match="ServiceUnavailable"):
        worker.process_batch([{"image_id": "01046"}], s3=_FlakyS3(), data_bucket=DATA, default_source=SOURCE)


def test_worker_reports_a_bad_item_without_touching_s3():
    result = worker.process_batch([{"image_id": "../../x"}], s3=_FlakyS3(), data_bucket=DATA,
                                  default_source=SOURCE)
    assert result.failures == [{"imageId": "../../x", "key": "", "reason": "not an ABID image id: '../../x'"}]


# --- issue 16: lists and requests that used to crash, mislead or fail late -----------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ('[{"quantity": 3}]', "entry 1 is not an id, a key or a record with an image_id: {\"quantity\": 3}"),
        ("[null]", "entry 1 is not an id, a key or a record with an image_id: null"),
        ('["01046", {"image_id": null}]', "entry 2 is not an id, a key or a record with an image_id"),
        ('["01046", true]', "entry 2 is not an id, a key or a record with an image_id: true"),
        ('[["01046"]]', "entry 1 is not an id, a key or a record with an image_id: [\"01046\"]"),
        ('{"image_id": null}\n', "line 1 is not a record with an image_id"),
    ],
)
def test_a_list_entry_without_an_image_id_is_refused_naming_it(text, answer):
    # Before: KeyError for a record without image_id, and the id "None" selected for null.
    with pytest.raises(ValueError) as refused:
        abid.parse_id_list(text)
    assert str(refused.value).startswith(answer)


def test_a_user_list_without_image_ids_fails_select_as_a_bad_request(s3):
    s3.put_object(Bucket=DATA, Key="manifests/user/records.json", Body=b'[{"quantity": 3}]')
    with pytest.raises(InvalidDatasetRequest, match=r"records\.json: entry 1 is not an id"):
        select.handler({"input": {"dataset": {"selector": "manifest",
                                              "manifestUri": f"s3://{DATA}/manifests/user/records.json"}},
                        "execution": "x"}, CONTEXT)


def test_a_list_larger_than_the_select_function_can_hold_is_refused_unread(s3, monkeypatch):
    # A 60 MB list added ~840 MB to the 1 GB function; the size in GetObject's answer decides before any read.
    assert select.MAX_LIST_BYTES == 16 * 2**20
    monkeypatch.setattr(select, "MAX_LIST_BYTES", 2**20)
    uri = upload_list(s3, [f"{i:05d}" for i in range(200_000)], key="manifests/user/huge.csv")
    with pytest.raises(InvalidDatasetRequest, match=r"huge\.csv is 1\.2 MiB; lists of at most 1 MiB are read"):
        select.handler({"input": {"dataset": {"selector": "manifest", "manifestUri": uri}}, "execution": "x"},
                       CONTEXT)


def test_a_source_bucket_the_stack_cannot_read_is_refused_at_select_time(s3):
    with pytest.raises(InvalidDatasetRequest, match="sourceBucket 'someone-elses-bucket' cannot be read by this "
                                                    "stack, which was deployed to read 'aft-vbi-pds'"):
        select.handler({"input": {"dataset": {"sourceBucket": "someone-elses-bucket"}}, "execution": "x"}, CONTEXT)
    plan = select.handler({"input": {"dataset": {"sourceBucket": SOURCE, "limit": 3}}, "execution": "y"}, CONTEXT)
    assert plan["sourceBucket"] == SOURCE


def test_a_missing_source_bucket_fails_each_image_instead_of_being_retried(s3):
    # Before: NoSuchBucket raised TransientCopyError, and the state machine retried the batch four times.
    result = worker.process_batch([{"image_id": "01046", "sourceBucket": "no-such-bucket-16"}], s3=s3,
                                  data_bucket=DATA, default_source=SOURCE)
    assert result.failures == [{"imageId": "01046", "key": "metadata/01046.json",
                                "reason": "source bucket s3://no-such-bucket-16 does not exist"}]


# --- issue 19: selectors for a full run ----------------------------------------------------------------------


def test_the_whole_counting_split_is_both_challenge_lists_and_travels_as_a_file_not_a_payload(s3):
    plan = select.handler({"input": {"dataset": {"selector": "challenge", "challengeSplit": "all"}},
                           "execution": "full"}, CONTEXT)
    train, validation = select.challenge_ids("train"), select.challenge_ids("validation")
    assert not set(train) & set(validation)  # disjoint lists, so "all" is their sum
    assert plan["selected"] == len(train) + len(validation) == 360_767
    csv_bytes = s3.get_object(Bucket=DATA, Key=plan["selectionKey"])["Body"].read()
    assert len(csv_bytes.splitlines()) == 360_768  # header + one id a line
    assert len(csv_bytes) < 4 * 2**20  # read from S3 by the Map's ItemReader, never carried in a state
    # A state's input or output is at most 262,144 bytes (Step Functions API, StateEnteredEventDetails.input):
    # the plan passed on carries the selection's key, never its ids.
    assert len(json.dumps(plan).encode()) < 2_000
    # Each child execution gets one batch of ingestBatchSize (100) items, shaped as the Map's ItemSelector
    # shapes them; a batch is bounded by the same 256 KiB (CDK ItemBatcher docs: "under the 256KB limit").
    ids = csv_bytes.decode().splitlines()[1:101]
    batch = {"Items": [{"image_id": i, **{f: plan[k] for f, k in worker.ITEM_FROM_PLAN.items()}} for i in ids],
             "BatchInput": {}}
    assert len(json.dumps(batch).encode()) < 262_144 // 10


def test_all_selector_lists_the_source_and_keeps_every_count(s3, sample_dir):
    labels = sample_labels(sample_dir)
    assert max(labels.values()) > 5  # the sample has bins the 0-5 split leaves out

    plan, outputs, result = ingest(s3, {"selector": "all"}, "everything")

    assert plan["selector"] == "all" and (plan["minCount"], plan["maxCount"]) == (None, None)
    assert plan["selected"] == len(labels)
    assert totals(outputs) == {"copied": 2 * len(labels), "unchanged": 0, "filtered": 0}
    records = abid.parse_records_jsonl(s3.get_object(Bucket=DATA, Key=result["recordsKey"])["Body"].read().decode())
    assert {r.image_id: r.quantity for r in records} == labels


def test_all_selector_is_a_deployable_default(s3, monkeypatch):
    monkeypatch.setenv("DATASET_SELECTOR", "all")
    plan = select.handler({"input": {"dataset": {"limit": 5}}, "execution": "default-all"}, CONTEXT)
    assert plan["selector"] == "all" and plan["selected"] == 5
    with pytest.raises(InvalidDatasetRequest, match="maxCount only applies to selector 'count-range'"):
        select.handler({"input": {"dataset": {"maxCount": 5}}, "execution": "x"}, CONTEXT)


def test_poison_metadata_and_an_oversized_photo_fail_only_themselves_in_a_batch(s3, sample_dir, restore_source,
                                                                               monkeypatch):
    ids = sorted(sample_labels(sample_dir))[:5]
    poison = {ids[0]: b'{"EXPECTED_QUANTITY": 9223372036854775808}',
              ids[1]: b'{"EXPECTED_QUANTITY": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
              ids[2]: b'{"EXPECTED_QUANTITY": 1, "x": ' + b"9" * 5000 + b"}"}
    for image_id, body in poison.items():
        restore_source(f"metadata/{image_id}.json")
        s3.put_object(Bucket=SOURCE, Key=f"metadata/{image_id}.json", Body=body)
    big = (sample_dir / "bin-images" / f"{ids[3]}.jpg").stat().st_size
    monkeypatch.setattr(abid, "MAX_PHOTO_BYTES", big - 1)  # the 8 MiB cap, scaled to this photo
    result = worker.process_batch([{"image_id": i} for i in ids], s3=s3, data_bucket=DATA, default_source=SOURCE)
    reasons = {f["imageId"]: f["reason"] for f in result.failures}
    assert sorted(reasons) == sorted(ids[:4])
    assert "metadata holds a 19-digit number (at most 18 digits)" in reasons[ids[0]]  # 2**63
    assert "RecursionError" in reasons[ids[1]] and "5000-digit number" in reasons[ids[2]]
    assert reasons[ids[3]].endswith(f"is {big} bytes, above the {big - 1} bytes a photo may have")
    assert [r["image_id"] for r in result.records] == [ids[4]]


def _reviewed_label(s3, image_id: str, count: int) -> str:
    """A label as the review API writes it (lambdas/review/store.py), for one of the sample photos."""
    from lambdas.review import store

    key = f"incoming/bin {image_id}.jpg"
    photo = Path(__file__).resolve().parents[2] / "data" / "abid-sample" / "bin-images" / f"{image_id}.jpg"
    put = s3.put_object(Bucket=DATA, Key=key, Body=photo.read_bytes())
    item = {"bucket": DATA, "key": key, "versionId": put.get("VersionId"), "reviewedCount": count,
            "reviewedBy": "reviewer-sub", "reviewedAt": "2026-12-06T10:00:00+00:00", "count": 2,
            "modelStatus": "mismatch", "expectedCount": 5}
    store.write_label(s3, DATA, item)
    return store.label_id(key, put.get("VersionId"))


def test_reviewed_labels_join_the_train_split_only_and_the_packers_read_them(s3, sample_dir):
    from lambdas.pack import packer

    labels = sample_labels(sample_dir)
    uri = upload_list(s3, sorted(labels)[:80])
    reviewed_id = _reviewed_label(s3, "01046", 4)

    _, _, result = ingest(s3, {"selector": "manifest", "manifestUri": uri}, "run-reviewed")

    assert result["reviewedUsed"] == 1
    parts = {name: {r.image_id: r.quantity for r in abid.parse_records_jsonl(
        s3.get_object(Bucket=DATA, Key=f"manifests/{result['runId']}/{name}.jsonl")["Body"].read().decode())}
        for name in ("train", "validation", "test")}
    assert parts["train"][reviewed_id] == 4  # the person's count, not the model's
    assert reviewed_id not in parts["validation"] and reviewed_id not in parts["test"]
    report = read_json(s3, result["reportKey"])
    assert report["reviewedUsed"] == 1 and report["counts"]["train"] == len(parts["train"])
    # The packers that build the training shards find it under raw/reviewed/ in ABID's layout.
    fetched = packer.fetch(s3, DATA, reviewed_id)
    assert fetched.sample is not None and fetched.sample.image.startswith(b"\xff\xd8")

    # The same run with includeReviewed false leaves people's labels out; so is an unusable answer.
    _, _, without = ingest(s3, {"selector": "manifest", "manifestUri": uri, "includeReviewed": False}, "run-plain")
    assert without["reviewedUsed"] == 0
    assert without["counts"]["validation"] == result["counts"]["validation"]
    assert without["counts"]["test"] == result["counts"]["test"]
