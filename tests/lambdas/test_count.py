"""The count Lambda in-process under moto: S3 -> SQS event -> endpoint stand-in -> DynamoDB + EventBridge.

The endpoint stand-in decodes each body with Pillow, as the model's container would, and answers in the
serving contract's shape; an undecodable body gets the container's 4xx, surfaced by SageMaker Runtime as a
ModelError. One test puts botocore's Stubber on a real sagemaker-runtime client for the exact error shapes.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import uuid
from decimal import Decimal
from urllib.parse import quote_plus

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto import mock_aws
from PIL import Image

from invmon import review
from lambdas.count import handler as count
from lambdas.count import records as rec

BUCKET = "invmon-data-test"
MAX_BYTES = 64 * 1024
MODEL = "invmon-dev-counter-20261125-000000-abcdef"


class FakeEndpoint:
    """Answers like the serving container: Pillow decodes the body or the request is a 400."""

    def __init__(self, predict) -> None:
        self.predict = predict
        self.calls: list[dict] = []

    def invoke_endpoint(self, *, EndpointName, ContentType, Accept, Body):
        self.calls.append({"EndpointName": EndpointName, "ContentType": ContentType, "Body": Body})
        try:
            with Image.open(io.BytesIO(Body)) as image:
                image.load()
        except Exception as error:  # the container answers any decode failure with a 400
            message = f"cannot decode image: {error}"
            raise ClientError(
                {"Error": {"Code": "ModelError",
                           "Message": f"Received client error (400) from primary with message \"{message}\""},
                 "OriginalStatusCode": 400, "OriginalMessage": message}, "InvokeEndpoint") from None
        answer = json.dumps(self.predict(Body)).encode()
        return {"Body": StreamingBody(io.BytesIO(answer), len(answer)), "ContentType": "application/json"}


def prediction(count_value: int, confidence: float = 0.9, classes: int = 7) -> dict:
    probabilities = [(1 - confidence) / (classes - 1)] * classes
    probabilities[min(count_value, classes - 1)] = confidence
    return {"count": count_value, "confidence": confidence, "classes": list(range(classes)),
            "probabilities": probabilities, "model": MODEL}


@pytest.fixture(scope="module")
def labels(sample_dir) -> dict[str, int]:
    with (sample_dir / "labels.csv").open() as handle:
        return {row["image_id"]: int(row["expected_quantity"]) for row in csv.DictReader(handle)}


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("COUNTS_TABLE", "counts")
    monkeypatch.setenv("IDEMPOTENCY_TABLE", "idempotency")
    monkeypatch.setenv("ENDPOINT_NAME", "invmon-dev-counter")
    monkeypatch.setenv("CONFIDENCE_THRESHOLD", "0.5")
    monkeypatch.setenv("MAX_IMAGE_BYTES", str(MAX_BYTES))
    monkeypatch.setenv("INCOMING_PREFIX", "incoming/")
    monkeypatch.setenv("EVENT_SOURCE", "invmon.count")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "count")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        dynamodb = boto3.client("dynamodb")
        review.create_counts_table("counts")  # the deployed table's keys and indexes (tests/infra keep them equal)
        dynamodb.create_table(TableName="idempotency", BillingMode="PAY_PER_REQUEST",
                              AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                              KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}])
        # Route the count events to a queue, as a team would, to see what was published.
        sqs = boto3.client("sqs")
        inbox = sqs.create_queue(QueueName="team-inbox")["QueueUrl"]
        inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events = boto3.client("events")
        events.put_rule(Name="count-alerts", EventPattern=json.dumps({"source": ["invmon.count"]}))
        events.put_targets(Rule="count-alerts", Targets=[{"Id": "inbox", "Arn": inbox_arn}])
        count.reset()
        yield {"s3": s3, "sqs": sqs, "inbox": inbox, "table": boto3.resource("dynamodb").Table("counts")}
        count.reset()


@pytest.fixture
def endpoint(aws, labels):
    """A stand-in for a perfect model: it answers each ABID photo with its true quantity."""
    truth = {}

    def predict(body: bytes) -> dict:
        return prediction(truth.get(body, 0))

    fake = FakeEndpoint(predict)
    fake.truth = truth
    count.services().runtime = fake
    return fake


def upload(aws, key: str, body: bytes, metadata: dict[str, str] | None = None) -> dict:
    """Put an object and return the S3 notification record that S3 would send for it."""
    response = aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=body, Metadata=metadata or {})
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-11-25T12:00:00.000Z", "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "uploads",
               "bucket": {"name": BUCKET, "arn": f"arn:aws:s3:::{BUCKET}"},
               "object": {"key": quote_plus(key), "size": len(body), "eTag": response["ETag"].strip('"'),
                          "versionId": response["VersionId"], "sequencer": uuid.uuid4().hex[:18].upper()}},
    }


def sqs_event(*bodies: dict) -> dict:
    return {"Records": [
        {"messageId": f"m{index}", "receiptHandle": f"r{index}", "body": json.dumps(body),
         "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1764072000000",
                        "SenderId": "AIDAS3", "ApproximateFirstReceiveTimestamp": "1764072000000"},
         "messageAttributes": {}, "md5OfBody": "x", "eventSource": "aws:sqs",
         "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:uploads", "awsRegion": "us-east-1"}
        for index, body in enumerate(bodies)
    ]}


def notification(*records: dict) -> dict:
    return {"Records": list(records)}


def record_of(aws, key: str, version_id: str) -> dict:
    return aws["table"].get_item(Key={"pk": rec.photo_pk(key), "sk": rec.version_sk(version_id)}).get("Item")


def photo_records(table) -> list[dict]:
    """The photo records in the counts table, not the review queue's day counters beside them: a confident
    answer joins the 2 % audit sample by a hash of its key and version, and moto's version ids are random, so
    whether a test's good photo also writes a day counter is chance."""
    return [item for item in table.scan()["Items"] if item["pk"].startswith(rec.photo_pk(""))]


def published(aws) -> list[dict]:
    messages = aws["sqs"].receive_message(QueueUrl=aws["inbox"], MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(m["Body"]) for m in messages]


def photo(sample_dir, image_id: str) -> bytes:
    return (sample_dir / "bin-images" / f"{image_id}.jpg").read_bytes()


def test_mixed_batch_gets_one_right_record_each_and_reports_no_failure(aws, endpoint, sample_dir, labels,
                                                                       lambda_context):
    real_id, spaced_id = "01046", "01062"
    real, spaced = photo(sample_dir, real_id), photo(sample_dir, spaced_id)
    endpoint.truth.update({real: labels[real_id], spaced: labels[spaced_id]})
    spaced_key = f"incoming/bin 7/Fächer – {spaced_id} (copy).jpg"
    events = {
        "real": upload(aws, f"incoming/{real_id}.jpg", real, {"expected-count": str(labels[real_id])}),
        "corrupt": upload(aws, "incoming/truncated.jpg", real[: len(real) // 3]),
        "empty": upload(aws, "incoming/empty.jpg", b""),
        "pdf": upload(aws, "incoming/packing-list.pdf", b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"),
        "oversized": upload(aws, "incoming/huge.jpg", b"\xff\xd8\xff\xe0" + bytes(MAX_BYTES + 1)),
        "spaced": upload(aws, spaced_key, spaced, {"expected-count": str(labels[spaced_id] + 1)}),
    }
    duplicate = events["real"]
    response = count.handler(
        sqs_event(*[notification(e) for e in events.values()], notification(duplicate)), lambda_context
    )

    assert response == {"batchItemFailures": []}
    version = {name: e["s3"]["object"]["versionId"] for name, e in events.items()}
    real_record = record_of(aws, f"incoming/{real_id}.jpg", version["real"])
    assert real_record["status"] == rec.MATCH
    assert real_record["count"] == labels[real_id] == real_record["expectedCount"]
    assert real_record["expectedFrom"] == "metadata"
    assert real_record["model"] == MODEL
    assert real_record["confidence"] == Decimal("0.9")
    assert len(real_record["probabilities"]) == len(real_record["classes"]) == 7
    assert real_record["versionId"] == version["real"]

    corrupt = record_of(aws, "incoming/truncated.jpg", version["corrupt"])
    assert (corrupt["status"], corrupt["rejectReason"]) == (rec.REJECTED, rec.CORRUPT)
    assert "cannot decode image" in corrupt["reason"]
    empty = record_of(aws, "incoming/empty.jpg", version["empty"])
    assert (empty["status"], empty["rejectReason"]) == (rec.REJECTED, rec.EMPTY)
    pdf = record_of(aws, "incoming/packing-list.pdf", version["pdf"])
    assert (pdf["status"], pdf["rejectReason"]) == (rec.REJECTED, rec.UNSUPPORTED_TYPE)
    assert "PDF" in pdf["reason"]
    huge = record_of(aws, "incoming/huge.jpg", version["oversized"])
    assert (huge["status"], huge["rejectReason"]) == (rec.REJECTED, rec.TOO_LARGE)
    assert huge["size"] == MAX_BYTES + 5
    spaced_record = record_of(aws, spaced_key, version["spaced"])
    assert spaced_record["key"] == spaced_key
    assert spaced_record["status"] == rec.MISMATCH
    assert (spaced_record["count"], spaced_record["expectedCount"]) == (labels[spaced_id], labels[spaced_id] + 1)
    # A mismatch waits for a person (the review queue's sparse index keys); a rejection does not.
    assert spaced_record["reviewQueue"] == "pending" and spaced_record["reviewReason"] == "status"
    assert "reviewQueue" not in huge

    # The endpoint saw the real photo once (the duplicate was not recounted), the spaced one, and the
    # corrupt one (only the endpoint can tell it is corrupt); the rejects never reached it.
    assert [call["Body"] for call in endpoint.calls].count(real) == 1
    assert len(endpoint.calls) == 3
    assert all(call["ContentType"] == "image/jpeg" for call in endpoint.calls)

    alerts = published(aws)
    assert [(a["detail-type"], a["detail"]["key"]) for a in alerts] == [("Photo count mismatch", spaced_key)]
    assert alerts[0]["detail"]["expectedCount"] == labels[spaced_id] + 1


def test_duplicate_delivery_in_a_later_batch_is_not_counted_again(aws, endpoint, sample_dir, labels,
                                                                  lambda_context):
    body = photo(sample_dir, "01117")
    endpoint.truth[body] = labels["01117"]
    event = upload(aws, "incoming/01117.jpg", body)
    assert count.handler(sqs_event(notification(event)), lambda_context) == {"batchItemFailures": []}
    assert count.handler(sqs_event(notification(event)), lambda_context) == {"batchItemFailures": []}
    assert len(endpoint.calls) == 1
    items = aws["table"].query(KeyConditionExpression="pk = :pk",
                               ExpressionAttributeValues={":pk": "photo#incoming/01117.jpg"})["Items"]
    assert len(items) == 1 and items[0]["status"] == rec.COUNTED  # no expected count anywhere


def test_new_version_of_the_same_key_is_counted_as_its_own_record(aws, endpoint, sample_dir, lambda_context):
    first = upload(aws, "incoming/bin.jpg", photo(sample_dir, "01129"))
    second = upload(aws, "incoming/bin.jpg", photo(sample_dir, "01149"))
    count.handler(sqs_event(notification(first), notification(second)), lambda_context)
    assert len(endpoint.calls) == 2
    items = aws["table"].query(KeyConditionExpression="pk = :pk",
                               ExpressionAttributeValues={":pk": "photo#incoming/bin.jpg"})["Items"]
    assert {i["versionId"] for i in items} == {first["s3"]["object"]["versionId"],
                                               second["s3"]["object"]["versionId"]}


def test_expected_count_comes_from_a_consignment_record_when_metadata_has_none(aws, endpoint, sample_dir,
                                                                               labels, lambda_context):
    body = photo(sample_dir, "01180")
    endpoint.truth[body] = labels["01180"]
    aws["table"].put_item(Item={"pk": "consignment#bin#01180", "sk": "consignment",
                                "expectedCount": labels["01180"]})
    event = upload(aws, "incoming/dock-3/01180.jpg", body)
    count.handler(sqs_event(notification(event)), lambda_context)
    item = record_of(aws, "incoming/dock-3/01180.jpg", event["s3"]["object"]["versionId"])
    assert (item["status"], item["expectedFrom"]) == (rec.MATCH, "consignment#bin#01180")


def test_low_confidence_count_is_not_compared_and_raises_an_event(aws, sample_dir, lambda_context):
    fake = FakeEndpoint(lambda body: prediction(2, confidence=0.31))
    count.services().runtime = fake
    event = upload(aws, "incoming/01046.jpg", photo(sample_dir, "01046"), {"expected-count": "2"})
    assert count.handler(sqs_event(notification(event)), lambda_context) == {"batchItemFailures": []}
    item = record_of(aws, "incoming/01046.jpg", event["s3"]["object"]["versionId"])
    assert item["status"] == rec.LOW_CONFIDENCE
    assert "below the 0.5 threshold" in item["reason"]
    # Queued for a person, most likely discrepancies first: the index sorts 1 - discrepancyProbability ascending.
    assert item["reviewQueue"] == "pending"
    assert item["reviewRank"].startswith(f"{1 - float(item['discrepancyProbability']):.6f}#")
    assert [a["detail-type"] for a in published(aws)] == ["Photo count uncounted-low-confidence"]


def test_a_full_review_day_still_queues_a_likelier_discrepancy_in_place_of_a_less_likely_one(
        aws, sample_dir, monkeypatch, lambda_context):
    monkeypatch.setenv("REVIEW_MAX_PER_DAY", "1")
    answers = {}
    count.services().runtime = FakeEndpoint(lambda body: answers[body])
    doubtful, wrong = photo(sample_dir, "01046"), photo(sample_dir, "01180")
    answers[doubtful] = prediction(2, confidence=0.31)  # unsure, but it could be the 2 announced
    answers[wrong] = prediction(2, confidence=0.95)  # sure it is 2 where 5 were announced
    first = upload(aws, "incoming/doubtful.jpg", doubtful, {"expected-count": "2"})
    second = upload(aws, "incoming/wrong.jpg", wrong, {"expected-count": "5"})
    for event in (first, second):
        assert count.handler(sqs_event(notification(event)), lambda_context) == {"batchItemFailures": []}

    kept = record_of(aws, "incoming/wrong.jpg", second["s3"]["object"]["versionId"])
    out = record_of(aws, "incoming/doubtful.jpg", first["s3"]["object"]["versionId"])
    assert kept["discrepancyProbability"] > out["discrepancyProbability"]
    assert kept["reviewQueue"] == "pending"
    assert "reviewQueue" not in out and "displaced" in out["reviewSkipped"]


def test_s3_test_event_is_acknowledged_without_a_record(aws, endpoint, lambda_context):
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-25T12:00:00.000Z",
                  "Bucket": BUCKET, "RequestId": "X", "HostId": "Y"}
    assert count.handler(sqs_event(test_event), lambda_context) == {"batchItemFailures": []}
    assert aws["table"].scan()["Items"] == []
    assert endpoint.calls == []


def test_endpoint_throttling_fails_only_that_message_and_a_retry_counts_it(aws, sample_dir, lambda_context):
    """Stubber on a real sagemaker-runtime client: throttling and a 5xx ModelError are retried through SQS
    (reported failures); a 4xx ModelError is a rejection; then the retried photo counts normally."""
    client = botocore.session.get_session().create_client("sagemaker-runtime", region_name="us-east-1")
    stubber = Stubber(client)
    count.services().runtime = client
    good, flaky, failing, bad = (upload(aws, f"incoming/{name}.jpg", photo(sample_dir, image_id))
                                 for name, image_id in (("good", "01046"), ("flaky", "01062"),
                                                        ("failing", "01117"), ("bad", "01129")))

    def ok(value: int) -> dict:
        body = json.dumps(prediction(value)).encode()
        return {"Body": StreamingBody(io.BytesIO(body), len(body)), "ContentType": "application/json"}

    stubber.add_response("invoke_endpoint", ok(3))
    stubber.add_client_error("invoke_endpoint", service_error_code="ThrottlingException", http_status_code=400)
    stubber.add_client_error("invoke_endpoint", service_error_code="ModelError", http_status_code=424,
                             modeled_fields={"OriginalStatusCode": 503, "OriginalMessage": "worker died"})
    stubber.add_client_error("invoke_endpoint", service_error_code="ModelError", http_status_code=424,
                             modeled_fields={"OriginalStatusCode": 415, "OriginalMessage": "image has no pixels"})
    with stubber:
        response = count.handler(sqs_event(*(notification(e) for e in (good, flaky, failing, bad))),
                                 lambda_context)
    assert response == {"batchItemFailures": [{"itemIdentifier": "m1"}, {"itemIdentifier": "m2"}]}
    assert record_of(aws, "incoming/good.jpg", good["s3"]["object"]["versionId"])["count"] == 3
    assert record_of(aws, "incoming/flaky.jpg", flaky["s3"]["object"]["versionId"]) is None
    bad_item = record_of(aws, "incoming/bad.jpg", bad["s3"]["object"]["versionId"])
    assert (bad_item["rejectReason"], bad_item["reason"]) == (rec.CORRUPT,
                                                              "the model could not read the image: image has no pixels")

    # SQS delivers the failed message again: the idempotency record of the failed attempt is gone.
    stubber.add_response("invoke_endpoint", ok(2))
    with stubber:
        assert count.handler(sqs_event(notification(flaky)), lambda_context) == {"batchItemFailures": []}
    assert record_of(aws, "incoming/flaky.jpg", flaky["s3"]["object"]["versionId"])["count"] == 2


def test_response_outside_the_contract_fails_the_message_rather_than_storing_nonsense(aws, sample_dir,
                                                                                      lambda_context):
    good_body, odd_body = photo(sample_dir, "01062"), photo(sample_dir, "01046")
    count.services().runtime = FakeEndpoint(
        lambda body: {"label": "three"} if body == odd_body else prediction(1))
    odd = upload(aws, "incoming/01046.jpg", odd_body)
    good = upload(aws, "incoming/01062.jpg", good_body)
    assert count.handler(sqs_event(notification(odd), notification(good)), lambda_context) == {
        "batchItemFailures": [{"itemIdentifier": "m0"}]}
    assert [i["key"] for i in photo_records(aws["table"])] == ["incoming/01062.jpg"]


def test_a_batch_where_everything_fails_lists_every_message_so_sqs_retries_it_whole(aws, sample_dir,
                                                                                      lambda_context):
    count.services().runtime = FakeEndpoint(lambda body: {"label": "three"})
    event = upload(aws, "incoming/01046.jpg", photo(sample_dir, "01046"))
    assert count.handler(sqs_event(notification(event)), lambda_context) == {
        "batchItemFailures": [{"itemIdentifier": "m0"}]}


def test_object_deleted_before_counting_is_recorded_as_missing(aws, endpoint, sample_dir, lambda_context):
    event = upload(aws, "incoming/gone.jpg", photo(sample_dir, "01046"))
    aws["s3"].delete_object(Bucket=BUCKET, Key="incoming/gone.jpg", VersionId=event["s3"]["object"]["versionId"])
    assert count.handler(sqs_event(notification(event)), lambda_context) == {"batchItemFailures": []}
    item = record_of(aws, "incoming/gone.jpg", event["s3"]["object"]["versionId"])
    assert (item["status"], item["rejectReason"]) == (rec.REJECTED, rec.MISSING)


def test_message_that_is_not_an_s3_notification_fails_to_the_dlq(aws, endpoint, lambda_context):
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET}
    event = sqs_event({}, test_event)
    event["Records"][0]["body"] = "not json at all"
    assert count.handler(event, lambda_context) == {"batchItemFailures": [{"itemIdentifier": "m0"}]}


# --- the pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "head", "code"),
    [
        (0, b"", rec.EMPTY),
        (10, b"%PDF-1.7\n", rec.UNSUPPORTED_TYPE),
        (10, b"GIF89a....", rec.UNSUPPORTED_TYPE),
        (10, b"RIFF\x00\x00\x00\x00WEBPVP8 ", rec.UNSUPPORTED_TYPE),
        (10, b"hello world", rec.NOT_AN_IMAGE),
        (2_000_000, b"\xff\xd8\xff\xe0", rec.TOO_LARGE),
    ],
)
def test_uploads_are_screened_by_size_and_magic_bytes(size, head, code):
    assert rec.check_upload(size, head, 1_000_000).code == code


def test_jpeg_and_png_pass_the_screen_with_their_content_type():
    assert rec.check_upload(10, b"\xff\xd8\xff\xdb", 100) is None
    assert rec.content_type(b"\xff\xd8\xff\xdb") == "image/jpeg"
    assert rec.check_upload(10, b"\x89PNG\r\n\x1a\n\x00", 100) is None
    assert rec.content_type(b"\x89PNG\r\n\x1a\n\x00") == "image/png"


def test_overflow_class_agrees_with_any_expected_count_at_or_above_it():
    answer = rec.read_prediction(prediction(6) | {"overflow_class": 6})
    assert rec.decide_status(answer, None, 9, 0.5) == rec.MATCH
    assert rec.decide_status(answer, None, 5, 0.5) == rec.MISMATCH
    assert rec.decide_status(rec.read_prediction(prediction(5)), None, 9, 0.5) == rec.MISMATCH


def test_a_bin_beyond_the_exact_counts_agrees_when_the_overflow_class_is_most_likely_whatever_count_was_answered():
    # A model serving exact counts only: it answers 5 (its best exact count) while "6 or more" holds most mass.
    probabilities = [0.0, 0.0, 0.02, 0.05, 0.1, 0.23, 0.6]
    answer = rec.read_prediction({"count": 5, "confidence": 0.23, "classes": list(range(7)),
                                  "probabilities": probabilities, "model": MODEL, "overflow_class": 6})
    assert rec.decide_status(answer, None, 9, 0.5) == rec.MATCH
    assert rec.decide_status(answer, None, 9, 0.7) == rec.LOW_CONFIDENCE
    # For a bin that should hold 5, the exact answer's own confidence (0.23) is what counts.
    assert rec.decide_status(answer, None, 5, 0.5) == rec.LOW_CONFIDENCE
    assert rec.decide_status(answer, None, 5, 0.2) == rec.MATCH


def test_unreadable_expected_count_metadata_is_noted_not_used():
    assert rec.expected_from_metadata({"expected-count": "three"}) == (
        None, "x-amz-meta-expected-count is not a count (ASCII digits, 0 to 1000000): 'three'")
    assert rec.expected_from_metadata({"Expected-Count": " 4 "}) == (4, None)


@pytest.mark.parametrize("value", ["1" * 39, "²", "①", "٣", "３", "-1", "1e3", "3.0", Decimal("1e40"),
                                   Decimal("NaN"), Decimal("2.5"), rec.MAX_EXPECTED_COUNT + 1, True])
def test_only_ascii_digits_in_a_sane_range_are_an_expected_count(value):
    assert rec.parse_expected(value) is None


@pytest.mark.parametrize(("value", "expected"), [("0", 0), (" 12 ", 12), (Decimal("7"), 7), (3, 3)])
def test_plain_expected_counts_are_read(value, expected):
    assert rec.parse_expected(value) == expected


# --- bulk counting -------------------------------------------------------------------------------------


TRANSFORM_ROLE = "arn:aws:iam::123456789012:role/invmon-transform"


def test_the_transform_model_names_the_transform_role_with_network_isolation():
    from lambdas.count import bulk

    served = {"ModelName": MODEL, "ExecutionRoleArn": "arn:aws:iam::123456789012:role/invmon-inference",
              "PrimaryContainer": {"Image": "img", "ModelDataUrl": "s3://b/m.tar.gz", "Environment": {"A": "1"}}}
    request = bulk.transform_model_request(served, "invmon-dev-counter-bulk-1", TRANSFORM_ROLE)
    assert request["ExecutionRoleArn"] == TRANSFORM_ROLE
    assert request["EnableNetworkIsolation"] is True
    assert request["PrimaryContainer"] == served["PrimaryContainer"]


def test_bulk_plan_screens_the_prefix_and_load_stores_the_transform_answers(aws, sample_dir, labels):
    from lambdas.count import bulk

    sagemaker = boto3.client("sagemaker")
    sagemaker.create_model(ModelName=MODEL, ExecutionRoleArn="arn:aws:iam::123456789012:role/sm",
                           PrimaryContainer={"Image": "img", "ModelDataUrl": "s3://b/m.tar.gz"})
    sagemaker.create_endpoint_config(EndpointConfigName=MODEL, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": MODEL, "InstanceType": "ml.c5.large",
        "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName="invmon-dev-counter", EndpointConfigName=MODEL)
    ids = ["01046", "01062", "01117"]
    for image_id in ids:
        aws["s3"].put_object(Bucket=BUCKET, Key=f"incoming/2026-11/{image_id}.jpg", Body=photo(sample_dir, image_id),
                             Metadata={"expected-count": str(labels[image_id])})
    aws["s3"].put_object(Bucket=BUCKET, Key="incoming/2026-11/manifest.pdf", Body=b"%PDF-1.4 ...")
    aws["s3"].put_object(Bucket=BUCKET, Key="incoming/2026-11/blank.jpg", Body=b"")
    table = aws["table"]

    job = bulk.plan(aws["s3"], sagemaker, table, bucket=BUCKET, prefix="incoming/2026-11/",
                    job_name="invmon-dev-counter-bulk-1", endpoint_name="invmon-dev-counter",
                    instance_type="ml.c6i.large", kms_key_id=None, bulk_prefix="reports/bulk/", threshold=0.5,
                    max_bytes=MAX_BYTES, role_arn=TRANSFORM_ROLE)
    assert (job["ModelName"], job["Accepted"], job["Rejected"]) == ("invmon-dev-counter-bulk-1", 3, 2)
    # The transform job runs its own model: the serving container and artifact, under the transform role.
    transform_model = sagemaker.describe_model(ModelName=job["ModelName"])
    assert transform_model["ExecutionRoleArn"] == TRANSFORM_ROLE
    assert transform_model["PrimaryContainer"]["ModelDataUrl"] == "s3://b/m.tar.gz"
    manifest = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key=f"{job['Base']}manifest.json")["Body"].read())
    assert manifest == [{"prefix": f"s3://{BUCKET}/"}, *[f"incoming/2026-11/{i}.jpg" for i in ids]]
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"
    statuses = {i["key"]: i["status"] for i in photo_records(table)}
    assert statuses == {"incoming/2026-11/manifest.pdf": rec.REJECTED, "incoming/2026-11/blank.jpg": rec.REJECTED}

    # What Batch Transform writes: one .out per input, named after the input's key; the last one is missing,
    # as when a job stops early.
    for image_id, answer in zip(ids[:2], (labels[ids[0]], labels[ids[1]] + 2), strict=True):
        aws["s3"].put_object(Bucket=BUCKET, Key=f"{job['Base']}out/incoming/2026-11/{image_id}.jpg.out",
                             Body=json.dumps(prediction(answer)).encode())
    first = bulk.load(aws["s3"], table, job=job, index=0, threshold=0.5, page=2)
    assert first == {"done": False, "next": {"index": 2}, "loaded": 2}
    second = bulk.load(aws["s3"], table, job=job, index=2, threshold=0.5, page=2)
    assert second == {"done": True, "next": {"index": 3}, "loaded": 0}
    items = {i["key"]: i for i in photo_records(table)}
    assert items["incoming/2026-11/01046.jpg"]["status"] == rec.MATCH
    assert items["incoming/2026-11/01062.jpg"]["status"] == rec.MISMATCH
    assert items["incoming/2026-11/01062.jpg"]["source"] == "bulk:invmon-dev-counter-bulk-1"
    assert "incoming/2026-11/01117.jpg" not in items
    page = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key=f"{job['Base']}load-0000002.json")["Body"].read())
    assert page["unanswered"] == ["incoming/2026-11/01117.jpg"]


@pytest.mark.parametrize(
    ("response", "verdict"),
    [
        ({"Error": {"Code": "ModelError", "Message": "wrapped"}, "OriginalStatusCode": 400,
          "OriginalMessage": "cannot identify image file"}, (400, "cannot identify image file")),
        ({"Error": {"Code": "ModelError", "Message": "wrapped"}, "OriginalStatusCode": 413,
          "OriginalMessage": "image is 40000x40000 pixels"}, (413, "image is 40000x40000 pixels")),
        ({"Error": {"Code": "ModelError", "Message": "wrapped"}, "OriginalStatusCode": 500}, None),
        # A misrouted, unauthorised or timed-out container says nothing about the photo: retried, then the DLQ.
        ({"Error": {"Code": "ModelError", "Message": "wrapped"}, "OriginalStatusCode": 401}, None),
        ({"Error": {"Code": "ModelError", "Message": "wrapped"}, "OriginalStatusCode": 404}, None),
        ({"Error": {"Code": "ModelError", "Message": "wrapped"}, "OriginalStatusCode": 408}, None),
        ({"Error": {"Code": "ModelError", "Message": "wrapped"}, "OriginalStatusCode": 415,
          "OriginalMessage": "unsupported image format: WebP"}, (415, "unsupported image format: WebP")),
        ({"Error": {"Code": "ModelError", "Message": "wrapped"}, "OriginalStatusCode": 429}, None),
        ({"Error": {"Code": "ValidationError", "Message": "Endpoint x not found"}}, None),
        ({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, None),
        # The offline endpoint (python -m ml.serve) answering directly: botocore reports the bare status.
        ({"Error": {"Code": "400", "Message": ""}}, (400, "HTTP 400 from the model container")),
        ({"Error": {"Code": "503", "Message": ""}}, None),
        ({"Error": {"Code": "404", "Message": ""}}, None),
    ],
)
def test_only_the_containers_own_4xx_is_a_verdict_on_the_photo(response, verdict):
    assert count.model_verdict(ClientError(response, "InvokeEndpoint")) == verdict


# --- against the real serving code ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """ml/inference.py in ``ml.serve`` (the container's /invocations) with an untrained head, behind a small
    stand-in for SageMaker Runtime's front end: it routes ``/endpoints/<name>/invocations`` to the container
    and wraps a container error as SageMaker does (HTTP 424, ``ModelError``, the container's status and
    message inside). The answers are the real serving code's, whatever their counts."""
    torch = pytest.importorskip("torch")
    import threading
    import urllib.error
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ml import serve
    from ml.model import ModelConfig, build_model, save_model

    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("served")
    save_model(build_model(7, pretrained=False), ModelConfig(image_size=64, model_id="contract-check"), model_dir)
    container = serve.make_server(model_dir, port=0)
    container_url = f"http://127.0.0.1:{container.server_address[1]}/invocations"

    class FrontEnd(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            assert self.path.startswith("/endpoints/invmon-dev-counter/invocations"), self.path
            request = urllib.request.Request(container_url, data=body, method="POST", headers={
                "Content-Type": self.headers["Content-Type"], "Accept": self.headers.get("Accept", "")})
            headers = {"Content-Type": "application/json"}
            try:
                with urllib.request.urlopen(request) as answer:
                    status, payload = answer.status, answer.read()
            except urllib.error.HTTPError as error:
                message = json.loads(error.read())["error"]
                status, headers["x-amzn-ErrorType"] = 424, "ModelError:http://internal.amazon.com/coral/com.amazonaws.sagemaker/"
                payload = json.dumps({"ErrorCode": "CLIENT_ERROR_FROM_MODEL", "OriginalStatusCode": error.code,
                                      "OriginalMessage": message,
                                      "Message": f"Received client error ({error.code}) from primary with message "
                                                 f"\"{message}\"."}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    front = ThreadingHTTPServer(("127.0.0.1", 0), FrontEnd)
    for server in (container, front):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{front.server_address[1]}"
    for server in (front, container):
        server.shutdown()
        server.server_close()


def test_count_lambda_reads_the_real_serving_contract(aws, served_model, sample_dir, lambda_context):
    session = botocore.session.get_session()
    count.services().runtime = session.create_client("sagemaker-runtime", region_name="us-east-1",
                                                     endpoint_url=served_model)
    body = photo(sample_dir, "01046")
    real = upload(aws, "incoming/real.jpg", body, {"expected-count": "3"})
    broken = upload(aws, "incoming/broken.jpg", body[: len(body) // 3])
    assert count.handler(sqs_event(notification(real), notification(broken)), lambda_context) == {
        "batchItemFailures": []}
    item = record_of(aws, "incoming/real.jpg", real["s3"]["object"]["versionId"])
    assert item["model"] == "contract-check"
    assert item["classes"] == list(range(7)) and item["overflowClass"] == 6
    assert abs(sum(item["probabilities"]) - 1) < Decimal("0.0001")
    assert item["status"] in {rec.MATCH, rec.MISMATCH, rec.LOW_CONFIDENCE}
    assert item["status"] != rec.LOW_CONFIDENCE or item["confidence"] < Decimal("0.5")
    bad = record_of(aws, "incoming/broken.jpg", broken["s3"]["object"]["versionId"])
    assert (bad["status"], bad["rejectReason"]) == (rec.REJECTED, rec.CORRUPT)
    assert bad["reason"].startswith("the model could not read the image: ")
    assert "HTTP" not in bad["reason"]  # the container's own message came through the ModelError


def test_bulk_counting_refuses_a_prefix_outside_the_incoming_prefix(monkeypatch, lambda_context):
    from lambdas.count import bulk

    monkeypatch.setenv("INCOMING_PREFIX", "incoming/")
    monkeypatch.setenv("ENDPOINT_NAME", "invmon-dev-counter")
    monkeypatch.setattr(bulk, "clients", lambda: (None, None, None))
    with pytest.raises(ValueError, match="the prefix must start with 'incoming/', got 'raw/'"):
        bulk.plan_handler({"input": {"prefix": "raw/"}}, lambda_context)


# --- under real limits and faults -----------------------------------------------------------------------


class DeadlineContext:
    """A Lambda context whose remaining time runs down like the real one's."""

    function_name = "invmon-test"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:invmon-test"
    aws_request_id = "00000000-0000-0000-0000-000000000001"

    def __init__(self, seconds: float) -> None:
        import time

        self._deadline = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        import time

        return int((self._deadline - time.monotonic()) * 1000)


@pytest.fixture
def stalling_endpoint():
    """A local stand-in for SageMaker Runtime that holds the first request (as a cold or stuck serverless
    endpoint does) and answers the others at once."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()
    seen: list[str] = []

    class Runtime(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(self.path)
            if len(seen) == 1:
                release.wait(15)
            payload = json.dumps(prediction(1)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Runtime)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    release.set()
    server.shutdown()
    server.server_close()


def test_a_stalled_endpoint_on_the_first_of_ten_records_returns_within_budget_failing_the_untried(
        aws, stalling_endpoint, sample_dir, monkeypatch):
    url, seen = stalling_endpoint
    # The real client as the Lambda builds it, with the limits infra sets, scaled down to seconds: one call
    # may take 1 + 2 s, plus 1.5 s for the rest of a record = 4.5 s; the invocation has 6 s.
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", url)
    for name, value in {"ENDPOINT_CONNECT_TIMEOUT": "1", "ENDPOINT_READ_TIMEOUT": "2",
                        "ENDPOINT_MAX_ATTEMPTS": "1", "RECORD_OVERHEAD_SECONDS": "1.5"}.items():
        monkeypatch.setenv(name, value)
    count.reset()
    events = [upload(aws, f"incoming/{index}.jpg", photo(sample_dir, "01046")) for index in range(10)]
    context = DeadlineContext(6.0)

    response = count.handler(sqs_event(*(notification(e) for e in events)), context)

    assert context.get_remaining_time_in_millis() > 0  # returned inside the function's timeout
    assert response == {"batchItemFailures": [{"itemIdentifier": f"m{i}"} for i in range(10)]}
    assert len(seen) == 1  # the nine others were never sent: they come back untried, not timed out
    assert aws["table"].scan()["Items"] == []
    assert count.services().call_budget_seconds == pytest.approx(4.5)
    # SQS delivers them again: a fresh invocation counts all ten (the stand-in answers at once now).
    assert count.handler(sqs_event(*(notification(e) for e in events)), DeadlineContext(60.0)) == {
        "batchItemFailures": []}
    # Photo records only: the table also holds the review queue's day counter (lambdas/review/queue.py).
    assert len(photo_records(aws["table"])) == 10


def test_the_endpoint_client_has_explicit_timeouts_and_retries_inside_the_budget(aws):
    config = count.services().runtime.meta.config
    assert (config.connect_timeout, config.read_timeout) == (count.CONNECT_TIMEOUT_SECONDS,
                                                             count.READ_TIMEOUT_SECONDS)
    assert config.retries == {"mode": "standard", "total_max_attempts": count.MAX_ATTEMPTS}


def test_a_photo_over_the_serverless_payload_limit_becomes_a_too_large_record(aws, endpoint, monkeypatch,
                                                                             lambda_context):
    from infra.config import load_settings

    # The default stack: a serverless endpoint, which takes at most 4 MB per request
    # (docs.aws.amazon.com/sagemaker/latest/dg/serverless-endpoints-invoke.html).
    settings = load_settings()
    assert settings.endpoint_mode == "serverless"
    monkeypatch.setenv("MAX_IMAGE_BYTES", str(settings.count_max_image_bytes))
    count.reset()
    count.services().runtime = endpoint
    body = b"\xff\xd8\xff\xe0" + bytes(4_500_000 - 4)
    event = upload(aws, "incoming/big.jpg", body)
    assert count.handler(sqs_event(notification(event)), lambda_context) == {"batchItemFailures": []}
    item = record_of(aws, "incoming/big.jpg", event["s3"]["object"]["versionId"])
    assert (item["status"], item["rejectReason"]) == (rec.REJECTED, rec.TOO_LARGE)
    assert endpoint.calls == []


def test_hostile_expected_counts_are_recorded_with_a_note(aws, endpoint, sample_dir, lambda_context):
    body = photo(sample_dir, "01046")
    events = {"digits": upload(aws, "incoming/digits.jpg", body, {"expected-count": "9" * 39})}
    for bin_id, value in (("b1", "²"), ("b2", "①"), ("b3", "٣"), ("b4", "３")):
        aws["table"].put_item(Item={"pk": f"consignment#bin#{bin_id}", "sk": "consignment", "expectedCount": value})
        events[bin_id] = upload(aws, f"incoming/{bin_id}.jpg", body)
    assert count.handler(sqs_event(*(notification(e) for e in events.values())), lambda_context) == {
        "batchItemFailures": []}
    for name, event in events.items():
        key = f"incoming/{name}.jpg"
        item = record_of(aws, key, event["s3"]["object"]["versionId"])
        assert item["status"] == rec.COUNTED and "expectedCount" not in item, name
        assert "not a count" in item["notes"][0] or "no usable expectedCount" in item["notes"][0]


@pytest.mark.parametrize("status", [401, 404, 408])
def test_a_model_error_that_does_not_judge_the_body_fails_the_record(aws, sample_dir, lambda_context, status):
    client = botocore.session.get_session().create_client("sagemaker-runtime", region_name="us-east-1")
    stubber = Stubber(client)
    count.services().runtime = client
    stubber.add_client_error("invoke_endpoint", service_error_code="ModelError", http_status_code=424,
                             modeled_fields={"OriginalStatusCode": status, "OriginalMessage": "not for you"})
    event = upload(aws, "incoming/01046.jpg", photo(sample_dir, "01046"))
    with stubber:
        response = count.handler(sqs_event(notification(event)), lambda_context)
    assert response == {"batchItemFailures": [{"itemIdentifier": "m0"}]}
    assert record_of(aws, "incoming/01046.jpg", event["s3"]["object"]["versionId"]) is None


OUT_OF_CONTRACT = {
    "count not a class": prediction(3) | {"count": 9},
    "confidence above 1": prediction(3) | {"confidence": 1.5},
    "negative confidence": prediction(3) | {"confidence": -0.1},
    "overflow not a class": prediction(3) | {"overflow_class": 12},
    "probability above 1": prediction(3) | {"probabilities": [2.0] + [0.0] * 6},
    "boolean count": prediction(1) | {"count": True},
    "unpaired probabilities": prediction(3) | {"probabilities": [1.0]},
    "operating point above 1": prediction(3) | {"operating_point": {
        "count_threshold": 1.2, "match_threshold": 0.8, "mismatch_threshold": 0.1}},
    "not an object": [1, 2, 3],
}


@pytest.mark.parametrize("answer", OUT_OF_CONTRACT.values(), ids=OUT_OF_CONTRACT.keys())
def test_an_answer_outside_the_contract_fails_the_record(aws, sample_dir, lambda_context, answer):
    odd_body, good_body = photo(sample_dir, "01046"), photo(sample_dir, "01062")
    count.services().runtime = FakeEndpoint(lambda body: answer if body == odd_body else prediction(1))
    # No expected count: nothing compares the answer with anything, so only the contract check can stop it.
    odd = upload(aws, "incoming/01046.jpg", odd_body)
    good = upload(aws, "incoming/01062.jpg", good_body)
    assert count.handler(sqs_event(notification(odd), notification(good)), lambda_context) == {
        "batchItemFailures": [{"itemIdentifier": "m0"}]}
    assert [i["key"] for i in photo_records(aws["table"])] == ["incoming/01062.jpg"]


def test_a_failed_record_is_logged_with_its_cause_and_counted_by_cause(aws, sample_dir, lambda_context, capsys,
                                                                       caplog):
    count.services().runtime = FakeEndpoint(lambda body: prediction(3) | {"confidence": 7})
    event = upload(aws, "incoming/01046.jpg", photo(sample_dir, "01046"))
    count.handler(sqs_event(notification(event)), lambda_context)
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING" and getattr(r, "cause", None)]
    assert (warning.bucket, warning.key, warning.cause) == (BUCKET, "incoming/01046.jpg", "bad-prediction")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (emf,) = [line for line in lines if "CountFailures" in line]
    assert emf["CountFailures"] in ([1.0], 1.0)
    assert (emf["cause"], emf["service"]) == ("bad-prediction", "count")
    assert emf["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service", "cause"]]


# --- the model's operating point -----------------------------------------------------------------------

POINT = {"count_threshold": 0.6, "match_threshold": 0.7, "mismatch_threshold": 0.2}


def answered(probabilities: list[float], *, point: dict | None = POINT, overflow: int | None = 6) -> dict:
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    answer = {"count": best, "confidence": probabilities[best], "classes": list(range(len(probabilities))),
              "probabilities": probabilities, "model": MODEL}
    if overflow is not None:
        answer["overflow_class"] = overflow
    if point is not None:
        answer["operating_point"] = point | {"targets": {"match_precision": 0.98}}  # extra keys are ignored
    return rec.read_prediction(answer)


@pytest.mark.parametrize(("probabilities", "expected", "status"), [
    ([0.0, 0.05, 0.8, 0.1, 0.05, 0.0, 0.0], None, rec.COUNTED),        # 0.8 >= count threshold 0.6
    ([0.0, 0.25, 0.5, 0.25, 0.0, 0.0, 0.0], None, rec.LOW_CONFIDENCE),  # 0.5 < 0.6
    ([0.0, 0.05, 0.8, 0.1, 0.05, 0.0, 0.0], 2, rec.MATCH),             # p(2) = 0.8 >= 0.7
    ([0.0, 0.05, 0.8, 0.1, 0.05, 0.0, 0.0], 3, rec.MISMATCH),          # p(3) = 0.1 <= 0.2
    ([0.0, 0.05, 0.5, 0.4, 0.05, 0.0, 0.0], 3, rec.LOW_CONFIDENCE),    # 0.2 < p(3) = 0.4 < 0.7: abstain
    ([0.0, 0.0, 0.0, 0.0, 0.1, 0.15, 0.75], 9, rec.MATCH),             # 9 >= overflow 6: p(6+) = 0.75
    ([0.0, 0.0, 0.0, 0.0, 0.1, 0.8, 0.1], 9, rec.MISMATCH),            # p(6+) = 0.1
])
def test_the_answers_operating_point_decides_when_the_stack_defers_to_the_model(probabilities, expected, status):
    decision = rec.decide(answered(probabilities), None, expected, None)
    assert (decision.status, decision.decided_by) == (status, rec.MODEL_RULE)
    assert decision.thresholds == POINT


def test_a_number_overrides_the_operating_point_and_an_answer_without_one_falls_back_to_half():
    probabilities = [0.0, 0.05, 0.5, 0.4, 0.05, 0.0, 0.0]
    overridden = rec.decide(answered(probabilities), None, 3, 0.45)
    assert (overridden.status, overridden.decided_by, overridden.thresholds) == (
        rec.MISMATCH, rec.CONFIG_RULE, {"threshold": 0.45})
    old_model = rec.decide(answered(probabilities, point=None), None, 2, None)
    assert (old_model.status, old_model.decided_by, old_model.thresholds) == (
        rec.MATCH, rec.CONFIG_RULE, {"threshold": 0.5})


def test_the_record_says_which_rule_decided_and_the_thresholds_it_used(aws, sample_dir, lambda_context,
                                                                      monkeypatch):
    monkeypatch.setenv("CONFIDENCE_THRESHOLD", "model")
    count.reset()
    point = {"count_threshold": 0.6, "match_threshold": 0.7, "mismatch_threshold": 0.2}
    count.services().runtime = FakeEndpoint(
        lambda body: prediction(2, confidence=0.5) | {"operating_point": point})
    event = upload(aws, "incoming/01046.jpg", photo(sample_dir, "01046"), {"expected-count": "2"})
    count.handler(sqs_event(notification(event)), lambda_context)
    item = record_of(aws, "incoming/01046.jpg", event["s3"]["object"]["versionId"])
    assert (item["status"], item["decidedBy"]) == (rec.LOW_CONFIDENCE, "model")
    assert item["thresholds"] == {"count_threshold": Decimal("0.6"), "match_threshold": Decimal("0.7"),
                                  "mismatch_threshold": Decimal("0.2")}
    assert "between the model's mismatch (0.200) and match (0.700) thresholds" in item["reason"]


@pytest.mark.parametrize("text", ["0.5x", "1.5", "-0.1", "modle"])
def test_a_threshold_setting_that_is_neither_model_nor_a_probability_is_refused(text):
    with pytest.raises(ValueError):
        rec.parse_threshold(text)


@pytest.mark.parametrize(("error", "cause"), [
    (count.OutOfTime("2 s left"), "out-of-time"),
    (ReadTimeoutError(endpoint_url="http://x"), "endpoint-timeout"),
    (ClientError({"Error": {"Code": "ThrottlingException"}}, "InvokeEndpoint"), "endpoint-throttled"),
    (ClientError({"Error": {"Code": "ModelError"}, "OriginalStatusCode": 503}, "InvokeEndpoint"), "endpoint-error"),
    (ClientError({"Error": {"Code": "ProvisionedThroughputExceededException"}}, "PutItem"), "aws-error"),
    (rec.BadPrediction("count 9 is not among the classes"), "bad-prediction"),
    (ValueError("SQS message is not JSON"), "bad-message"),
    (KeyError("s3"), "unexpected"),
])
def test_each_failure_is_named_by_one_of_the_dashboards_causes(error, cause):
    assert count.failure_cause(error) == cause and cause in count.FAILURE_CAUSES


def test_bulk_counts_started_in_the_same_second_get_distinct_transform_job_names() -> None:
    from datetime import UTC, datetime

    from lambdas.count.bulk import MAX_JOB_NAME, transform_job_name

    now = datetime(2026, 12, 6, 13, 0, 0, tzinfo=UTC)
    first = transform_job_name("invmon-dev-counter", "bulk-a", now)
    second = transform_job_name("invmon-dev-counter", "bulk-b", now)
    assert first != second
    assert first.startswith("invmon-dev-counter-bulk-20261206-130000-")
    longest = "p" * 31 + "-prod-counter"  # the longest endpoint name the project/stage knobs allow
    names = {transform_job_name(longest, execution, now) for execution in ("a", "b")}
    assert len(names) == 2 and all(len(n) <= MAX_JOB_NAME and n.startswith(f"{longest}-bulk-") for n in names)


# --- the posterior rule (ml.decisions) -------------------------------------------------------------------

PRIOR = [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2]
POSTERIOR_POINT = {"count_threshold": 0.6, "match_max_discrepancy": 0.02, "mismatch_min_discrepancy": 0.3,
                   "class_prior": PRIOR, "consignment_error_rate": 0.05}


def _q(p: float, pi: float, r: float = 0.05) -> float:
    # By hand: wrong = r (1 - p) / (1 - pi), right = (1 - r) p / pi.
    wrong, right = r * (1 - p) / (1 - pi), (1 - r) * p / pi
    return wrong / (wrong + right)


@pytest.mark.parametrize(("probabilities", "expected", "status", "q"), [
    ([0.0, 0.02, 0.9, 0.05, 0.03, 0.0, 0.0], 2, rec.MATCH, _q(0.9, 0.1)),             # q = 0.0065 <= 0.02
    ([0.0, 0.05, 0.9, 0.01, 0.04, 0.0, 0.0], 3, rec.MISMATCH, _q(0.01, 0.1)),         # q = 0.37 >= 0.3
    ([0.0, 0.05, 0.85, 0.05, 0.05, 0.0, 0.0], 3, rec.LOW_CONFIDENCE, _q(0.05, 0.1)),  # q = 0.10: abstain
    ([0.0, 0.0, 0.0, 0.0, 0.05, 0.05, 0.9], 9, rec.MATCH, _q(0.9, 0.2)),              # 9 items: p(6+), pi(6+)
    ([0.0, 0.0, 0.0, 0.0, 0.01, 0.98, 0.01], 9, rec.MISMATCH, _q(0.01, 0.2)),         # q = 0.57
])
def test_the_posterior_that_the_consignment_is_wrong_decides_and_is_recorded(probabilities, expected, status, q):
    decision = rec.decide(answered(probabilities, point=POSTERIOR_POINT), None, expected, None, 0.05)
    assert (decision.status, decision.decided_by) == (status, rec.MODEL_RULE)
    assert decision.discrepancy == pytest.approx(q, rel=1e-9)


def test_a_decision_the_model_never_takes_abstains_and_says_why():
    point = POSTERIOR_POINT | {"mismatch_min_discrepancy": None,
                               "not_decided": {"mismatch_min_discrepancy": "alert precision 50 % unreachable"}}
    decision = rec.decide(answered([0.0, 0.0, 0.98, 0.01, 0.01, 0.0, 0.0], point=point), None, 3, None, 0.05)
    assert decision.status == rec.LOW_CONFIDENCE
    assert "no mismatch above (alert precision 50 % unreachable)" in decision.reason
    assert decision.discrepancy == pytest.approx(_q(0.01, 0.1))  # 0.37: an alert, were alerts taken


def test_every_rule_writes_the_discrepancy_probability_with_an_expected_count(aws, sample_dir, lambda_context,
                                                                              monkeypatch):
    monkeypatch.setenv("CONSIGNMENT_ERROR_RATE", "0.2")
    count.reset()
    count.services().runtime = FakeEndpoint(
        lambda body: prediction(2, confidence=0.5) | {"operating_point": POSTERIOR_POINT})
    checked = upload(aws, "incoming/01046.jpg", photo(sample_dir, "01046"), {"expected-count": "2"})
    unchecked = upload(aws, "incoming/01062.jpg", photo(sample_dir, "01062"))
    count.handler(sqs_event(notification(checked), notification(unchecked)), lambda_context)
    item = record_of(aws, "incoming/01046.jpg", checked["s3"]["object"]["versionId"])
    # At the stack's rate (0.2), not the one the model's thresholds were chosen at.
    assert float(item["discrepancyProbability"]) == pytest.approx(_q(0.5, 0.1, 0.2), abs=1e-6)
    assert "discrepancyProbability" not in record_of(aws, "incoming/01062.jpg", unchecked["s3"]["object"]["versionId"])
    # The stack's single threshold and an answer without an operating point write it too (uniform prior).
    for threshold, point in ((0.45, POSTERIOR_POINT), (None, None)):
        answer = answered([0.0, 0.05, 0.5, 0.4, 0.05, 0.0, 0.0], point=point)
        decision = rec.decide(answer, None, 3, threshold, 0.05)
        assert decision.discrepancy == pytest.approx(_q(0.4, 0.1 if point else 1 / 7), rel=1e-9)


@pytest.mark.parametrize("text", ["0", "0.9", "five", "nan"])
def test_an_error_rate_setting_outside_its_range_is_refused(text):
    with pytest.raises(ValueError, match="CONSIGNMENT_ERROR_RATE"):
        rec.parse_error_rate(text)


BROKEN_POINTS = {
    "NaN": {"match_max_discrepancy": float("nan")},
    "infinity": {"mismatch_min_discrepancy": float("inf")},
    "string": {"count_threshold": "0.6"},
    "list": {"match_max_discrepancy": [0.02]},
    "inverted": {"match_max_discrepancy": 0.5},
    "out of range": {"mismatch_min_discrepancy": 1.3},
}


@pytest.mark.parametrize("change", BROKEN_POINTS.values(), ids=BROKEN_POINTS.keys())
def test_an_answer_with_thresholds_that_cannot_decide_is_outside_the_contract(change):
    answer = prediction(3) | {"operating_point": POSTERIOR_POINT | change}
    with pytest.raises(rec.BadPrediction, match=next(iter(change))):
        rec.read_prediction(json.loads(json.dumps(answer)))


# --- a redelivered or late event never overwrites a record a person decided or a newer event wrote (issue 24,
# item 7): the write is conditional on S3's sequencer (S3 User Guide, "Event message structure": left-pad the
# shorter sequencer with zeros, then compare lexicographically; the greater is the later event).

REDELIVERED_KEY = "incoming/01046.jpg"


def _forget_idempotency(aws) -> None:
    """What 24 hours do: the idempotency records expire, so a redelivery is counted again."""
    import boto3

    table = boto3.resource("dynamodb").Table("idempotency")
    for item in table.scan()["Items"]:
        table.delete_item(Key={"id": item["id"]})


def _with_sequencer(event: dict, sequencer: str) -> dict:
    event = copy.deepcopy(event)
    event["s3"]["object"]["sequencer"] = sequencer
    return event


def _count(aws, event: dict, lambda_context) -> dict:
    _forget_idempotency(aws)
    assert count.handler(sqs_event(notification(event)), lambda_context) == {"batchItemFailures": []}
    return record_of(aws, REDELIVERED_KEY, event["s3"]["object"]["versionId"])


def test_a_redelivery_after_the_idempotency_window_keeps_the_record(aws, endpoint, sample_dir, labels,
                                                                    lambda_context) -> None:
    body = photo(sample_dir, "01046")
    endpoint.truth[body] = labels["01046"] + 1  # the model disagrees with the consignment: a mismatch
    event = upload(aws, REDELIVERED_KEY, body, {"expected-count": str(labels["01046"])})
    assert _count(aws, event, lambda_context)["status"] == rec.MISMATCH
    endpoint.truth[body] = labels["01046"]  # the same event, counted again today, would be a match
    assert _count(aws, event, lambda_context)["status"] == rec.MISMATCH


def test_a_record_a_person_decided_is_never_overwritten(aws, endpoint, sample_dir, labels,
                                                        lambda_context) -> None:
    body = photo(sample_dir, "01046")
    endpoint.truth[body] = labels["01046"]
    event = upload(aws, REDELIVERED_KEY, body, {"expected-count": str(labels["01046"])})
    first = _count(aws, event, lambda_context)
    aws["table"].put_item(Item=first | {"status": "reviewed"})
    newer = _with_sequencer(event, "F" * 20)  # even a newer event
    assert _count(aws, newer, lambda_context)["status"] == "reviewed"


def test_a_newer_event_replaces_the_record_and_a_late_older_one_does_not(aws, endpoint, sample_dir,
                                                                         labels, lambda_context) -> None:
    body = photo(sample_dir, "01046")
    endpoint.truth[body] = labels["01046"] + 1
    event = upload(aws, REDELIVERED_KEY, body, {"expected-count": str(labels["01046"])})
    early, late = _with_sequencer(event, "0055612AF1A2B3C4D5"), _with_sequencer(event, "0055612AF1A2B3C4D6")
    assert _count(aws, late, lambda_context)["status"] == rec.MISMATCH
    endpoint.truth[body] = labels["01046"]
    assert _count(aws, early, lambda_context)["status"] == rec.MISMATCH, "an older event arrived late"
    # A shorter sequencer is padded on the left: "56612AF1A2B3C4D7" is later than "0055612AF1A2B3C4D6".
    assert _count(aws, _with_sequencer(event, "56612AF1A2B3C4D7"), lambda_context)["status"] == rec.MATCH


def test_event_order_pads_on_the_left_so_strings_sort_as_events() -> None:
    assert rec.event_order("ff") > rec.event_order("0f") and rec.event_order("100") > rec.event_order("ff")
    assert rec.event_order(None) is None
