"""Pack functions against moto: raw/ and a run's split records seeded from the real sample (as ingest leaves
them), then plan -> one packer per plan item (shaped as the Distributed Map passes it) -> finish, the way the
state machine chains them, with the Map's results exported as its ResultWriter does."""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from lambdas.ingest import aws
from lambdas.pack import finish, layout, packer, plan
from ml import abid, shards
from tests.lambdas.conftest import FakeLambdaContext

RUN = "run-1"
PLAN = "0123456789abcdef"  # a plan id, for packers called without a plan
DATA = ""  # set per test by the s3 fixture
CONTEXT = FakeLambdaContext(function_name="pack-test")


@pytest.fixture
def s3(sample_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A KMS-encrypted data bucket holding raw/ (60 real sample photos) and the run's split records."""
    global DATA
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        DATA = f"data-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=DATA)
        key_id = boto3.client("kms", region_name="us-east-1").create_key()["KeyMetadata"]["KeyId"]
        client.put_bucket_encryption(Bucket=DATA, ServerSideEncryptionConfiguration={"Rules": [{
            "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_id}}]})
        records = []
        for path in sorted((sample_dir / abid.METADATA_DIR).glob("*.json"))[:60]:
            image_id = path.stem
            image, metadata = layout.raw_keys(image_id)
            client.put_object(Bucket=DATA, Key=metadata, Body=path.read_bytes())
            photo = sample_dir / abid.IMAGE_DIR / f"{image_id}.jpg"
            client.put_object(Bucket=DATA, Key=image, Body=photo.read_bytes())
            records.append(abid.parse_metadata(image_id, path.read_bytes()))
        parts = abid.stratified_split(records, validation_fraction=0.2, test_fraction=0.2)
        for split, part in parts.items():
            client.put_object(Bucket=DATA, Key=f"manifests/{RUN}/{split}.jsonl", Body=abid.records_jsonl(part).encode())
        for name, value in {"DATA_BUCKET": DATA, "PACK_PHOTOS_PER_SHARD": "16", "PACK_THREADS": "4",
                            "INGEST_TOLERATED_FAILURE_PERCENT": "5", "POWERTOOLS_SERVICE_NAME": "pack"}.items():
            monkeypatch.setenv(name, value)
        aws.s3.cache_clear()
        yield client
        aws.s3.cache_clear()


def ingest_result() -> dict[str, Any]:
    """``$.ingest`` as ingest's split step returns it."""
    manifests = f"s3://{DATA}/manifests/{RUN}"
    return {"runId": RUN, "recordsKey": f"manifests/{RUN}/records.jsonl",
            "channels": {split: f"{manifests}/{split}.manifest" for split in abid.SPLITS},
            "counts": {}, "reportKey": f"reports/ingest/{RUN}.json"}


def split_records(s3, split: str) -> list[abid.AbidRecord]:
    body = s3.get_object(Bucket=DATA, Key=f"manifests/{RUN}/{split}.jsonl")["Body"].read().decode()
    return abid.parse_records_jsonl(body)


def read_json(s3, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=DATA, Key=key)["Body"].read())


def run_pack_map(s3, planned: dict[str, Any], *, failing: frozenset[int] = frozenset()) -> dict[str, Any]:
    """What the Distributed Map does: read the plan (S3 JSON ItemReader), one packer per item, and export the
    children as the ResultWriter does. Items whose position is in ``failing`` end as failed children."""
    items = read_json(s3, planned["planKey"])
    succeeded, failed = [], []
    for number, item in enumerate(items):
        arn = f"arn:aws:states:us-east-1:123456789012:execution:pack/Map:{uuid.uuid4()}"
        if number in failing:
            failed.append({"ExecutionArn": arn, "Input": json.dumps(item), "Status": "FAILED",
                           "Error": "TransientPackError", "Cause": "GetObject: SlowDown"})
            continue
        output = packer.handler(item, CONTEXT)
        succeeded.append({"ExecutionArn": arn, "Input": json.dumps(item), "Output": json.dumps(output),
                          "Status": "SUCCEEDED"})
    prefix = f"{layout.MAP_RESULTS_PREFIX}/{uuid.uuid4()}"
    files: dict[str, list] = {"SUCCEEDED": [], "FAILED": [], "PENDING": []}
    for status, entries in (("SUCCEEDED", succeeded), ("FAILED", failed)):
        if entries:
            s3.put_object(Bucket=DATA, Key=f"{prefix}/{status}_0.json", Body=json.dumps(entries).encode())
            files[status].append({"Key": f"{prefix}/{status}_0.json", "Size": 0})
    s3.put_object(Bucket=DATA, Key=f"{prefix}/manifest.json",
                  Body=json.dumps({"DestinationBucket": DATA, "ResultFiles": files}).encode())
    return {"MapRunArn": "arn:aws:states:::mapRun:pack", "ResultWriterDetails": {"Bucket": DATA,
                                                                                 "Key": f"{prefix}/manifest.json"}}


def pack(s3, **map_options: Any) -> dict[str, Any]:
    """plan -> map -> finish, with the state passing of infra/pack.py ($.pack, then $.pack.packed)."""
    planned = plan.handler(ingest_result(), CONTEXT)
    return finish.handler({**planned, "packed": run_pack_map(s3, planned, **map_options)}, CONTEXT)


def plan_of(s3) -> str:
    """The plan id of the run's plan as the plan step writes it (each item carries it)."""
    (plan_id,) = {item["planId"] for item in read_json(s3, layout.plan_key(RUN))}
    return plan_id


def shard_objects(s3) -> dict[str, Any]:
    listed = s3.list_objects_v2(Bucket=DATA, Prefix=layout.SHARD_PREFIX).get("Contents", [])
    return {entry["Key"]: entry["LastModified"] for entry in listed}


def test_every_split_is_packed_into_shards_that_read_back_as_exactly_its_records(s3) -> None:
    result = pack(s3)

    assert set(result["channels"]) == set(abid.SPLITS)
    for split in abid.SPLITS:
        prefix = result["channels"][split]
        assert prefix == f"s3://{DATA}/shards/{plan_of(s3)}/{split}/"
        keys = sorted(k for k in shard_objects(s3) if k.startswith(prefix.removeprefix(f"s3://{DATA}/")))
        assert len(keys) == result["shards"][split] == -(-len(split_records(s3, split)) // 16)
        assert keys[0].endswith(f"/{split}-000000.tar")
        read: list[abid.AbidRecord] = []
        for key in keys:
            for sample in shards.read_shard(io.BytesIO(s3.get_object(Bucket=DATA, Key=key)["Body"].read())):
                assert sample.missing() is None
                assert sample.image.startswith(b"\xff\xd8")
                read.append(abid.parse_metadata(sample.key, sample.metadata))
        # Every record of the split, once, in id order across the shards, with the labels ingest recorded.
        assert read == split_records(s3, split)
        assert result["photos"][split] == len(read)
    assert result["reviewedUsed"] == 0
    report = read_json(s3, result["reportKey"])
    assert result["reportKey"] == f"reports/pack/{RUN}.json"
    assert report["failed"] == 0 and report["failures"] == []
    assert report["shardsWritten"] == sum(result["shards"].values()) and report["shardsUnchanged"] == 0
    assert sum(report["bytes"].values()) == sum(
        s3.head_object(Bucket=DATA, Key=key)["ContentLength"] for key in shard_objects(s3))


def test_a_rerun_writes_nothing_new(s3) -> None:
    first = pack(s3)
    before = shard_objects(s3)
    puts: list[str] = []
    aws.s3().meta.events.register("provide-client-params.s3.PutObject",
                                  lambda params, **_: puts.append(params["Key"]))
    second = pack(s3)
    assert second == first
    assert shard_objects(s3) == before  # same keys, LastModified unchanged
    assert puts, "the hook sees the step's other writes (plan, report)"
    assert [key for key in puts if key.startswith(layout.SHARD_PREFIX)] == []
    assert read_json(s3, second["reportKey"])["shardsUnchanged"] == len(before)


def test_a_shard_whose_photos_changed_is_written_again(s3, sample_dir: Path) -> None:
    pack(s3)
    first_train = split_records(s3, "train")[0].image_id
    other = next(p for p in sorted((sample_dir / abid.IMAGE_DIR).glob("*.jpg")) if p.stem != first_train)
    s3.put_object(Bucket=DATA, Key=layout.raw_keys(first_train)[0], Body=other.read_bytes())
    result = pack(s3)
    report = read_json(s3, result["reportKey"])
    assert report["shardsWritten"] == 1  # the first train shard only
    head = s3.head_object(Bucket=DATA, Key=layout.shard_key(plan_of(s3), "train", 0))
    body = s3.get_object(Bucket=DATA, Key=layout.shard_key(plan_of(s3), "train", 0))["Body"].read()
    assert head["Metadata"][packer.CONTENT_DIGEST] == shards.digest(body)


def test_a_missing_photo_is_reported_with_its_reason_and_the_rest_is_packed(s3) -> None:
    missing = split_records(s3, "train")[3].image_id
    s3.delete_object(Bucket=DATA, Key=layout.raw_keys(missing)[0])
    planned = plan.handler(ingest_result(), CONTEXT)
    first = read_json(s3, planned["planKey"])[0]
    assert missing in first["ids"]

    output = packer.handler(first, CONTEXT)
    assert output["failures"] == [{"imageId": missing,
                                   "reason": f"raw/bin-images/{missing}.jpg does not exist (NoSuchKey)"}]
    assert output["photos"] == len(first["ids"]) - 1
    body = s3.get_object(Bucket=DATA, Key=output["key"])["Body"].read()
    assert [s.key for s in shards.read_shard(io.BytesIO(body))] == [i for i in first["ids"] if i != missing]

    # One photo of 60 is 1.7 %, inside the 5 % tolerated: the stage goes on, the report names the photo.
    result = finish.handler({**planned, "packed": run_pack_map(s3, planned)}, CONTEXT)
    report = read_json(s3, result["reportKey"])
    assert report["failures"] == [{**output["failures"][0], "split": "train"}]
    assert result["photos"]["train"] == len(split_records(s3, "train")) - 1


def test_reviewed_photos_are_counted_for_training_only_where_they_were_packed(s3, sample_dir: Path) -> None:
    # Three of the review loop's labels joined train at ingest (lambdas/ingest/split.py); one lost its photo.
    train = split_records(s3, "train")
    reviewed = []
    for number, path in enumerate(sorted((sample_dir / abid.METADATA_DIR).glob("*.json"))[:3]):
        image_id = f"{layout.REVIEWED_ID_PREFIX}{number:020x}"
        image, metadata = layout.raw_keys(image_id)
        assert image.startswith(layout.REVIEWED_PREFIX)
        s3.put_object(Bucket=DATA, Key=metadata, Body=path.read_bytes())
        if number:
            s3.put_object(Bucket=DATA, Key=image,
                          Body=(sample_dir / abid.IMAGE_DIR / f"{path.stem}.jpg").read_bytes())
        reviewed.append(abid.parse_metadata(image_id, path.read_bytes()))
    s3.put_object(Bucket=DATA, Key=f"manifests/{RUN}/train.jsonl",
                  Body=abid.records_jsonl(sorted([*train, *reviewed])).encode())

    result = pack(s3)
    assert result["reviewedUsed"] == 2
    assert result["photos"]["train"] == len(train) + 2
    report = read_json(s3, result["reportKey"])
    assert report["reviewed"] == {"train": 2, "validation": 0, "test": 0}
    assert [f["imageId"] for f in report["failures"]] == [reviewed[0].image_id]


def test_unreadable_photos_and_metadata_are_reported_not_packed(s3) -> None:
    ids = [r.image_id for r in split_records(s3, "train")[:2]]
    s3.put_object(Bucket=DATA, Key=layout.raw_keys(ids[0])[0], Body=b"<html>not a photo</html>")
    s3.put_object(Bucket=DATA, Key=layout.raw_keys(ids[1])[1], Body=b"{\"EXPECTED_QUANTITY\": -1}")
    output = packer.handler({"runId": RUN, "planId": PLAN, "split": "train", "index": 0, "ids": ids}, CONTEXT)
    assert output["photos"] == 0 and output["key"] is None  # nothing left to pack: no empty shard is written
    reasons = {f["imageId"]: f["reason"] for f in output["failures"]}
    assert reasons[ids[0]] == f"raw/bin-images/{ids[0]}.jpg is unreadable: not a JPEG (24 bytes)"
    assert reasons[ids[1]].startswith(f"raw/metadata/{ids[1]}.json is unreadable: EXPECTED_QUANTITY")
    assert shard_objects(s3) == {}


def test_too_many_failures_fail_the_stage_after_writing_the_report(s3) -> None:
    for record in split_records(s3, "validation")[:4]:  # 4 of 60: 6.7 %, above the tolerated 5 %
        s3.delete_object(Bucket=DATA, Key=layout.raw_keys(record.image_id)[1])
    with pytest.raises(finish.TooManyFailures, match=r"4 of 60 photos could not be packed \(6.7 %\)"):
        pack(s3)
    report = read_json(s3, layout.report_key(RUN))
    assert [f["split"] for f in report["failures"]] == ["validation"] * 4
    assert all(f["reason"].endswith("does not exist (NoSuchKey)") for f in report["failures"])


def test_a_shard_whose_packer_kept_failing_reports_each_of_its_photos(s3, monkeypatch) -> None:
    monkeypatch.setenv("INGEST_TOLERATED_FAILURE_PERCENT", "50")
    planned = plan.handler(ingest_result(), CONTEXT)
    lost = read_json(s3, planned["planKey"])[0]
    result = finish.handler({**planned, "packed": run_pack_map(s3, planned, failing=frozenset({0}))}, CONTEXT)
    report = read_json(s3, result["reportKey"])
    assert sorted(f["imageId"] for f in report["failures"]) == lost["ids"]
    assert {f["reason"] for f in report["failures"]} == {
        "packing shard train-000000 failed: TransientPackError: GetObject: SlowDown"}


def test_a_failed_pack_map_reports_every_planned_photo_and_fails(s3) -> None:
    planned = plan.handler(ingest_result(), CONTEXT)
    error = {"Error": "States.ItemReaderFailed", "Cause": "Access denied"}
    with pytest.raises(finish.PackMapFailed, match=r"pack map failed: States\.ItemReaderFailed: Access denied"):
        finish.handler({**planned, "packError": error}, CONTEXT)
    assert read_json(s3, layout.report_key(RUN))["failed"] == 60


def test_a_transient_s3_error_raises_so_the_state_machine_retries(s3, monkeypatch) -> None:
    client = aws.s3()

    def slow_down(**_: Any) -> Any:
        raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                          "GetObject")

    monkeypatch.setattr(client, "get_object", slow_down)
    record = split_records(s3, "train")[0]
    with pytest.raises(packer.TransientPackError, match="SlowDown"):
        packer.handler({"runId": RUN, "planId": PLAN, "split": "train", "index": 0, "ids": [record.image_id]},
                       CONTEXT)


def test_the_result_of_a_largest_shard_of_missing_photos_fits_a_step_functions_state(s3) -> None:
    # Step Functions carries at most 262,144 bytes of UTF-8 as a state's output (API reference,
    # TaskSucceededEventDetails: "Maximum length of 262144"); plan.MAX_PHOTOS_PER_SHARD keeps every result
    # under it, even one that lists every photo of its shard as failed. ABID ids have at most six digits.
    ids = [str(n) for n in range(900_000, 900_000 + plan.MAX_PHOTOS_PER_SHARD)]
    output = packer.pack_shard(packer.ShardTask(runId=RUN, planId=PLAN, split="train", index=0, ids=ids), s3=aws.s3(),
                               data_bucket=DATA, threads=16)
    assert len(output["failures"]) == plan.MAX_PHOTOS_PER_SHARD
    assert len(json.dumps(output).encode()) < 262_144


def test_the_plan_cuts_each_split_in_id_order_into_shards_of_the_configured_size(s3) -> None:
    planned = plan.handler(ingest_result(), CONTEXT)
    items = read_json(s3, planned["planKey"])
    assert planned["planKey"] == f"reports/pack/plans/{RUN}.json"
    for split in abid.SPLITS:
        ids = [r.image_id for r in split_records(s3, split)]
        mine = [item for item in items if item["split"] == split]
        assert [item["index"] for item in mine] == list(range(len(mine)))
        assert [len(item["ids"]) for item in mine[:-1]] == [16] * (len(mine) - 1)
        assert [i for item in mine for i in item["ids"]] == sorted(ids)
        assert planned["photos"][split] == len(ids) and planned["shards"][split] == len(mine)
    assert plan.handler(ingest_result(), CONTEXT) == planned  # the same run gives the same plan


@pytest.mark.parametrize("bad", ["0", str(plan.MAX_PHOTOS_PER_SHARD + 1)])
def test_a_photos_per_shard_outside_its_range_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="PACK_PHOTOS_PER_SHARD must be between 1 and"):
        plan.photos_per_shard({"PACK_PHOTOS_PER_SHARD": bad})


# --- runs that cannot mix (#25 item 2) ------------------------------------------------------------------


def test_the_shards_live_under_the_plans_digest_so_only_an_identical_plan_shares_them(s3) -> None:
    planned = plan.handler(ingest_result(), CONTEXT)
    items = read_json(s3, planned["planKey"])
    assert planned["planId"] == plan.plan_id([{k: v for k, v in i.items() if k != "planId"} for i in items])
    assert {item["planId"] for item in items} == {planned["planId"]}
    # Another run of the same records: the same plan, the same prefix (reused); one photo fewer: another prefix.
    assert plan.plan_id(plan.cut("other-run", "train", items[0]["ids"], 16)) == plan.plan_id(
        plan.cut(RUN, "train", items[0]["ids"], 16))
    assert plan.plan_id(plan.cut(RUN, "train", items[0]["ids"][1:], 16)) != plan.plan_id(
        plan.cut(RUN, "train", items[0]["ids"], 16))
    result = finish.handler({**planned, "packed": run_pack_map(s3, planned)}, CONTEXT)
    assert all(uri.endswith(f"/shards/{planned['planId']}/{split}/") for split, uri in result["channels"].items())


def test_a_planned_shard_left_with_no_photo_removes_what_an_earlier_run_of_the_plan_packed_there(s3) -> None:
    pack(s3)
    first = read_json(s3, layout.plan_key(RUN))[0]
    key = layout.shard_key(first["planId"], first["split"], first["index"])
    assert key in shard_objects(s3)
    for image_id in first["ids"]:
        s3.delete_object(Bucket=DATA, Key=layout.raw_keys(image_id)[0])
    output = packer.handler(first, CONTEXT)
    assert output["key"] is None
    assert key not in shard_objects(s3)  # the plan's prefix holds only what this run reports


def test_a_reused_shard_past_half_its_retention_is_refreshed_so_it_cannot_expire_under_a_job(
        s3, monkeypatch) -> None:
    pack(s3)
    first = read_json(s3, layout.plan_key(RUN))[0]
    key = layout.shard_key(first["planId"], first["split"], first["index"])
    written = s3.head_object(Bucket=DATA, Key=key)
    copies: list[str] = []
    aws.s3().meta.events.register("provide-client-params.s3.CopyObject",
                                  lambda params, **_: copies.append(params["Key"]))
    monkeypatch.setenv("SHARD_RETENTION_DAYS", "30")
    assert packer.handler(first, CONTEXT)["written"] is False
    assert copies == []  # young: left alone
    real_head = aws.s3().head_object

    def aged(**kwargs: Any) -> Any:
        return real_head(**kwargs) | {"LastModified": written["LastModified"] - timedelta(days=16)}

    monkeypatch.setattr(aws.s3(), "head_object", aged)
    assert packer.handler(first, CONTEXT)["written"] is False
    assert copies == [key]
    refreshed = s3.head_object(Bucket=DATA, Key=key)
    assert refreshed["Metadata"] == written["Metadata"] and refreshed["ContentLength"] == written["ContentLength"]


POISON_METADATA = {
    "a 2**63 EXPECTED_QUANTITY": b'{"EXPECTED_QUANTITY": 9223372036854775808}',
    "a quantity above any bin": b'{"EXPECTED_QUANTITY": 20000}',
    "a 5,000-digit number": b'{"EXPECTED_QUANTITY": 1, "x": ' + b"9" * 5000 + b"}",
    "deep nesting": b'{"EXPECTED_QUANTITY": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nesting past the cap": b'{"EXPECTED_QUANTITY": 1, "x": ' + b"[" * 40 + b"]" * 40 + b"}",
    "an oversized document": b'{"EXPECTED_QUANTITY": 1, "pad": "' + b"x" * (abid.MAX_METADATA_BYTES + 1) + b'"}',
}


def test_poison_metadata_fails_only_its_own_photo_in_the_packer(s3) -> None:
    ids = [r.image_id for r in split_records(s3, "train")[: len(POISON_METADATA) + 2]]
    for image_id, body in zip(ids, POISON_METADATA.values(), strict=False):
        s3.put_object(Bucket=DATA, Key=layout.raw_keys(image_id)[1], Body=body)
    task = {"runId": RUN, "planId": "0123456789abcdef", "split": "train", "index": 0, "ids": ids}
    output = packer.handler(task, CONTEXT)
    reasons = {f["imageId"]: f["reason"] for f in output["failures"]}
    assert sorted(reasons) == sorted(ids[: len(POISON_METADATA)])
    assert output["photos"] == 2
    for (what, _), image_id in zip(POISON_METADATA.items(), ids, strict=False):
        assert reasons[image_id].startswith(f"raw/metadata/{image_id}.json"), what


def test_an_object_above_the_size_cap_is_refused_with_its_size_without_being_read_whole(s3, monkeypatch) -> None:
    ids = [r.image_id for r in split_records(s3, "train")[:2]]
    monkeypatch.setattr(abid, "MAX_PHOTO_BYTES", 1000)  # the 8 MiB cap, scaled to the sample's photos
    s3.put_object(Bucket=DATA, Key=layout.raw_keys(ids[0])[0], Body=b"\xff\xd8\xff" + b"\0" * 4999)
    s3.put_object(Bucket=DATA, Key=layout.raw_keys(ids[1])[0], Body=b"\xff\xd8\xff" + b"\0" * 500)
    fetched = packer.fetch(s3, DATA, ids[0])
    assert fetched.reason == (f"raw/bin-images/{ids[0]}.jpg is 5002 bytes, above the 1000 bytes a packed object "
                              "may have")
    assert packer.fetch(s3, DATA, ids[1]).sample is not None
