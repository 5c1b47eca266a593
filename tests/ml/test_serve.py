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


@pytest.fixture(scope="module")
def strict_endpoint(tiny_model_dir: Path) -> Iterator[tuple[str, int]]:
    """The server with a short read timeout, for clients that stop sending."""
    server = serve.make_server(tiny_model_dir, port=0, read_timeout=1.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "127.0.0.1", server.server_address[1]
    server.shutdown()
    server.server_close()


def _raw(address: tuple[str, int], request: bytes) -> bytes:
    """Send raw bytes and read until the server closes or answers (a 10 s cap: the test, not the server)."""
    import socket

    with socket.create_connection(address, timeout=10) as connection:
        connection.sendall(request)
        received = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                return received + b"<client gave up>"
            if not chunk:
                return received
            received += chunk
            if b"\r\n\r\n" in received:
                head, _, rest = received.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if len(rest) >= length:
                    return received


def test_a_negative_content_length_is_a_400_not_a_hang(strict_endpoint) -> None:
    answer = _raw(strict_endpoint, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                   b"Content-Length: -1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"Content-Length" in answer


def test_a_client_that_stops_sending_is_cut_off_after_the_read_timeout(strict_endpoint) -> None:
    answer = _raw(strict_endpoint, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                   b"Content-Length: 1000\r\n\r\nonly this")
    assert answer == b""  # the server closed the connection well before the client's own 10 s


def test_a_chunked_body_is_read_whole(strict_endpoint, sample_photo: bytes) -> None:
    import http.client

    connection = http.client.HTTPConnection(*strict_endpoint, timeout=30)
    chunks = [sample_photo[i : i + 1000] for i in range(0, len(sample_photo), 1000)]
    connection.request("POST", "/invocations", body=iter(chunks), encode_chunked=True,
                       headers={"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200, answer
    # The same photo sent whole gets the same answer: every chunk arrived, in order.
    assert answer == _post(f"http://{strict_endpoint[0]}:{strict_endpoint[1]}", sample_photo, "image/jpeg")[1]


def test_both_content_length_and_chunked_is_refused(strict_endpoint) -> None:
    answer = _raw(strict_endpoint, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                   b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")


def test_a_deeply_nested_json_body_is_a_400(endpoint: str) -> None:
    status, answer = _post(endpoint, b"[" * 50_000 + b"]" * 50_000, "application/json")
    assert status == 400 and "nests too deeply" in answer["error"]


@pytest.mark.parametrize("accept", ["text/html, application/json", "*/*;q=0.8"])
def test_an_accept_listing_json_among_others_is_answered(endpoint: str, sample_photo: bytes, accept: str) -> None:
    request = urllib.request.Request(f"{endpoint}/invocations", data=sample_photo, method="POST",
                                     headers={"Content-Type": "image/jpeg", "Accept": accept})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200 and "count" in json.loads(response.read())


def test_a_webp_sent_as_jpeg_gets_415(endpoint: str, sample_photo: bytes) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(sample_photo)).save(buffer, format="WEBP")
    status, answer = _post(endpoint, buffer.getvalue(), "image/jpeg")
    assert status == 415 and "WebP" in answer["error"]
