from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml import serve


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir: Path) -> Iterator[str]:
    server = serve.make_server(tiny_model_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_ping_answers_once_the_model_is_loaded(endpoint: str) -> None:
    with urllib.request.urlopen(f"{endpoint}/ping", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read())["status"] == "healthy"


def test_invocations_counts_a_real_photo(endpoint: str, sample_photo: bytes) -> None:
    status, answer = _post(endpoint, sample_photo, "image/jpeg")
    assert status == 200 and answer["count"] in answer["classes"] and 0 < answer["confidence"] <= 1


def test_invocations_answers_a_json_batch(endpoint: str, sample_photo: bytes) -> None:
    body = json.dumps({"instances": [{"b64": base64.b64encode(sample_photo).decode()}] * 2}).encode()
    status, answer = _post(endpoint, body, "application/json")
    assert status == 200 and len(answer["predictions"]) == 2


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b"", "image/jpeg", 400), (b"garbage", "image/png", 400), (b"x", "text/csv", 415),
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(
    endpoint: str, sample_photo: bytes, body: bytes, content_type: str, status: int
) -> None:
    got, answer = _post(endpoint, body, content_type)
    assert got == status and answer["error"]
    assert _post(endpoint, sample_photo, "image/jpeg")[0] == 200
