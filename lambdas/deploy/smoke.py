"""Smoke check Lambda: once the endpoint is InService on the new config, one known photo goes to it, and the answer
is read exactly as the count Lambda reads answers (``lambdas.count.records``: ``read_answer`` checks the serving
contract of ``ml/inference.py`` output_fn, ``decide`` applies the answer's operating point and the posterior at the
stack's error rate). The deploy stage finishes (and records the model in service) only when this passes; otherwise
it rolls the endpoint back to its previous config (infra/deploy.py).

Input: ``{"endpointName"}``. Output: ``{"passed", "cause", "count", "status"}``; a failed check is an answer, not
an error, so that the state machine can say why.

The photo is ``data/abid-sample/bin-images/01046.jpg``: a real bin photo of the Amazon Bin Image Dataset (Amazon,
Registry of Open Data on AWS, CC BY-NC-SA 3.0 US; see data/abid-sample/README.md), 224x224, 3 items.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from lambdas.count import records as rec

logger = Logger()
tracer = Tracer()

PHOTO = Path(__file__).with_name("smoke-photo.jpg")
PHOTO_EXPECTED = 3  # EXPECTED_QUANTITY of 01046 in data/abid-sample/labels.csv
CONTENT_TYPE = "image/jpeg"
# InvokeEndpoint takes a body of at most 6 MB (botocore's sagemaker-runtime model: Body max 6291456 bytes), and a
# serverless endpoint at most 4 MB of request and of response ("Invoke a serverless endpoint", SageMaker developer
# guide). The photo must stay far below the smaller one; it is 6 KB.
MAX_BODY_BYTES = 4 * 1024 * 1024
# "A customer's model containers must respond to requests within 60 seconds. [...] If your model is going to take
# 50-60 seconds of processing time, the SDK socket timeout should be set to be 70 seconds" (InvokeEndpoint API
# reference); a serverless endpoint's container also has 1 minute to answer /invocations (same guide as above).
READ_TIMEOUT_SECONDS = 70
CONNECT_TIMEOUT_SECONDS = 5
# Two tries: a serverless endpoint's first invocation after InService starts a container (cold start).
ATTEMPTS = 2
# The function's timeout: every try waits out its read timeout, plus room to start and to answer.
LAMBDA_TIMEOUT_SECONDS = ATTEMPTS * (READ_TIMEOUT_SECONDS + CONNECT_TIMEOUT_SECONDS) + 20


def runtime_client() -> Any:
    # A new client per call (one call per deploy): the offline demo moves the endpoint's URL when it changes.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("sagemaker-runtime", region_name=region, config=Config(
        read_timeout=READ_TIMEOUT_SECONDS, connect_timeout=CONNECT_TIMEOUT_SECONDS,
        retries={"mode": "standard", "max_attempts": ATTEMPTS}))


def check(runtime: Any, endpoint_name: str, photo: bytes, *, expected: int, threshold: float | None,
          error_rate: float) -> dict[str, Any]:
    """Sends ``photo`` to the endpoint and reads the answer as the count Lambda would; never raises for what the
    endpoint does: ``passed`` False with a ``cause`` a person can act on."""
    assert len(photo) <= MAX_BODY_BYTES, f"the smoke photo is {len(photo)} bytes; InvokeEndpoint takes {MAX_BODY_BYTES}"

    def failed(cause: str) -> dict[str, Any]:
        return {"passed": False, "cause": f"smoke check of endpoint {endpoint_name} failed: {cause}",
                "count": None, "status": None}

    try:
        response = runtime.invoke_endpoint(EndpointName=endpoint_name, ContentType=CONTENT_TYPE,
                                           Accept="application/json", Body=photo)
        body = response["Body"].read()
    except ClientError as error:
        details = error.response.get("Error", {})
        return failed(f"InvokeEndpoint answered {details.get('Code')}: {details.get('Message')}")
    except BotoCoreError as error:
        return failed(f"InvokeEndpoint did not answer: {error}")
    try:
        prediction = rec.read_answer(body)
        decision = rec.decide(prediction, None, expected, threshold, error_rate)
    except (rec.BadPrediction, ValueError, TypeError) as error:
        return failed(f"the answer to a known photo is one the count Lambda would refuse: {error}")
    return {"passed": True, "cause": None, "count": prediction["count"], "status": decision.status}


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    result = check(runtime_client(), event["endpointName"], PHOTO.read_bytes(), expected=PHOTO_EXPECTED,
                   threshold=rec.parse_threshold(os.environ.get("CONFIDENCE_THRESHOLD", "model")),
                   error_rate=rec.parse_error_rate(os.environ.get("CONSIGNMENT_ERROR_RATE")))
    logger.info("smoke check", extra=result)
    return result
