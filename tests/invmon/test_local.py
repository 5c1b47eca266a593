"""LocalEndpoints: each SageMaker endpoint moto holds is served by ml.serve with its model, or marked Failed."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from invmon.demo import SHIPPED_MODEL
from invmon.local import LocalEndpoints

BUCKET = "models"


@pytest.fixture
def sagemaker() -> Iterator[Any]:
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield boto3.client("sagemaker", region_name="us-east-1")


def deploy(sagemaker: Any, model_dir: Path | None, name: str = "counter") -> None:
    """CreateModel/CreateEndpointConfig/CreateEndpoint as the release step asks, with ``model_dir`` packed as
    SageMaker's model.tar.gz (an empty archive for None)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(model_dir.rglob("*")) if model_dir else []:
            tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
    boto3.client("s3", region_name="us-east-1").put_object(Bucket=BUCKET, Key=f"{name}/model.tar.gz",
                                                           Body=buffer.getvalue())
    sagemaker.create_model(ModelName=f"{name}-model", ExecutionRoleArn="arn:aws:iam::123456789012:role/r",
                           PrimaryContainer={"Image": "image", "ModelDataUrl": f"s3://{BUCKET}/{name}/model.tar.gz"})
    sagemaker.create_endpoint_config(EndpointConfigName=f"{name}-config", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": f"{name}-model", "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config")


@pytest.mark.slow
def test_an_endpoint_is_served_with_its_models_archive_and_stopped_on_close(sagemaker: Any, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", raising=False)
    deploy(sagemaker, SHIPPED_MODEL)
    endpoints = LocalEndpoints(tmp_path)
    try:
        (line,) = endpoints.sync()
        assert "served by ml.serve" in line
        url = os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"]
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as response:
            assert response.status == 200
        assert endpoints.sync() == []  # the same config is not served twice
        served = tmp_path / "endpoints" / "counter" / "counter-config"
        assert (served / "model-config.json").is_file()
    finally:
        endpoints.close()
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME" not in os.environ


def test_an_endpoint_whose_model_cannot_be_served_is_failed_with_the_reason(sagemaker: Any, tmp_path: Path) -> None:
    deploy(sagemaker, None)
    endpoints = LocalEndpoints(tmp_path)
    try:
        (line,) = endpoints.sync()
    finally:
        endpoints.close()
    assert "Failed" in line
    described = sagemaker.describe_endpoint(EndpointName="counter")
    assert described["EndpointStatus"] == "Failed"
    assert described["FailureReason"].startswith("the model could not be served here:")


# --- children end with their parent, however it ends (issue 24, item 2; invmon/lifeline.py) -------------------

_PARENT = """
import sys, threading, time
from invmon.local import ChildProcess
children = []
# Started from a thread that ends at once: the child must outlive the thread, only not the process.
starter = threading.Thread(target=lambda: children.append(ChildProcess([sys.executable, "-c", sys.argv[1]])))
starter.start()
starter.join()
print(children[0].pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("child_code", [
    "import time; time.sleep(300)",
    # Still starting up (importing torch, seconds) when its parent dies: the watch begins before its own code.
    "import torch, time; time.sleep(300)",
])
def test_a_child_ends_when_its_parent_is_killed_even_started_from_a_finished_thread(child_code: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    from invmon.lifeline import GRACE_SECONDS

    parent = subprocess.Popen([sys.executable, "-c", _PARENT, child_code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _alive(child), "the child must outlive the thread that started it"
        parent.send_signal(signal.SIGKILL)  # no cleanup at all in the parent
        parent.wait(10)
        deadline = time.monotonic() + GRACE_SECONDS + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the child outlived its killed parent"
    finally:
        parent.kill()
