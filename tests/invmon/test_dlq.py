"""`invmon dlq`: list what the count dead-letter queue holds, and redrive it after a fix."""

from __future__ import annotations

import json
from urllib.parse import quote_plus

import boto3
import botocore.session
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from invmon import aws
from invmon.cli import main


def _notification(key: str) -> str:
    return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": "invmon-data"}, "object": {"key": quote_plus(key), "size": 10}}}]})


@pytest.fixture
def dead_letters(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        dlq = sqs.create_queue(QueueName="count-dlq")["QueueUrl"]
        template = {"Resources": {"Placeholder": {"Type": "AWS::SNS::Topic"}},
                    "Outputs": {"CountDeadLetterQueueUrl": {"Value": dlq}}}
        boto3.client("cloudformation", region_name="us-east-1").create_stack(
            StackName="Invmon-dev", TemplateBody=json.dumps(template))
        for key in ("incoming/bin 7/01046.jpg", "incoming/01062.jpg"):
            sqs.send_message(QueueUrl=dlq, MessageBody=_notification(key))
        sqs.send_message(QueueUrl=dlq, MessageBody="not json at all")
        yield sqs, dlq


def test_dlq_list_names_the_uploads_and_leaves_them_in_the_queue(dead_letters, capsys):
    sqs, dlq = dead_letters
    assert main(["dlq", "list"]) == 0
    out = capsys.readouterr().out
    assert "3 message(s) in the count dead-letter queue" in out
    assert "incoming/bin 7/01046.jpg" in out and "incoming/01062.jpg" in out and "not an S3 notification" in out
    depth = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])
    assert depth["Attributes"]["ApproximateNumberOfMessages"] == "3"  # listing moved nothing


def test_dlq_redrive_starts_a_move_task_back_to_the_source_queue():
    # moto has no StartMessageMoveTask; Stubber checks the request against the real SQS API model.
    client = botocore.session.get_session().create_client("sqs", region_name="us-east-1")
    stubber = Stubber(client)
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/count-dlq"
    arn = "arn:aws:sqs:us-east-1:123456789012:count-dlq"
    stubber.add_response("get_queue_attributes", {"Attributes": {"QueueArn": arn}},
                         {"QueueUrl": url, "AttributeNames": ["QueueArn"]})
    # No DestinationArn: SQS moves the messages back to the queue they came from.
    stubber.add_response("start_message_move_task", {"TaskHandle": "task-1"}, {"SourceArn": arn})
    deployment = aws.Deployment(_outputs={"CountDeadLetterQueueUrl": url}, _clients={"sqs": client})
    with stubber:
        assert aws.redrive_dead_letters(deployment) == "task-1"
    stubber.assert_no_pending_responses()


def test_a_redrive_already_running_is_a_message_not_a_traceback():
    client = botocore.session.get_session().create_client("sqs", region_name="us-east-1")
    stubber = Stubber(client)
    stubber.add_response("get_queue_attributes", {"Attributes": {"QueueArn": "arn:aws:sqs:us-east-1:1:q"}})
    stubber.add_client_error("start_message_move_task", service_error_code="UnsupportedOperation",
                             service_message="There is already a task running.")
    deployment = aws.Deployment(_outputs={"CountDeadLetterQueueUrl": "https://q"}, _clients={"sqs": client})
    with stubber, pytest.raises(aws.CliError, match="cannot be redriven now: There is already a task running"):
        aws.redrive_dead_letters(deployment)


def test_dlq_list_shows_every_one_of_51_messages_and_leaves_all_visible(dead_letters, capsys):
    """SQS returns at most 10 per receive; a zero-visibility listing saw the same 10 again and stopped there."""
    sqs, dlq = dead_letters
    for index in range(48):
        sqs.send_message(QueueUrl=dlq, MessageBody=_notification(f"incoming/extra-{index:02d}.jpg"))
    assert main(["dlq", "list"]) == 0
    out = capsys.readouterr().out
    assert "51 message(s)" in out and "showing" not in out
    assert all(f"incoming/extra-{index:02d}.jpg" in out for index in range(48))
    attributes = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["All"])["Attributes"]
    assert (attributes["ApproximateNumberOfMessages"], attributes["ApproximateNumberOfMessagesNotVisible"]) == (
        "51", "0"), "every listed message is visible again at once"


def test_dlq_list_over_its_limit_says_how_to_see_the_rest(dead_letters, capsys):
    assert main(["dlq", "list", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "showing 2 of about 3: see them all with --limit 3" in out
