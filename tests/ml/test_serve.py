from __future__ import annotations

import base64
import contextlib
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


# --- limits (issue 24, item 8) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_endpoint(tiny_model_dir: Path) -> Iterator[tuple[str, int]]:
    """A short request deadline (1.5 s) and a read timeout (5 s) that a trickling client never trips alone."""
    server = serve.make_server(tiny_model_dir, port=0, read_timeout=5.0, request_deadline=1.5, max_decodes=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "127.0.0.1", server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_client_trickling_a_byte_at_a_time_is_cut_off_at_the_request_deadline(limited_endpoint) -> None:
    import socket
    import time

    answer = b""
    with socket.create_connection(limited_endpoint, timeout=10) as connection:
        connection.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                           b"Content-Length: 100\r\n\r\n")
        started = time.monotonic()
        connection.settimeout(0.5)  # one byte every 0.5 s: each read is well within the 5 s read timeout
        while not answer and time.monotonic() - started < 8:
            with contextlib.suppress(OSError):  # the server may have shut its side
                connection.sendall(b"x")
            with contextlib.suppress(TimeoutError):
                answer += connection.recv(65536)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert elapsed < 5, "cut off at the 1.5 s deadline, not after the 8 s the client would go on"


def test_two_content_length_headers_are_refused(limited_endpoint) -> None:
    answer = _raw(limited_endpoint, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                    b"Content-Length: 5\r\nContent-Length: 3\r\n\r\nabcde")
    assert answer.startswith(b"HTTP/1.1 400") and b"2 Content-Length headers" in answer


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"gzip", b"identity"])
def test_a_transfer_coding_other_than_chunked_is_refused(limited_endpoint, coding: bytes) -> None:
    answer = _raw(limited_endpoint, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                    b"Transfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 501"), answer


def test_an_oversized_body_gets_413_before_it_is_sent_when_the_client_asks(limited_endpoint) -> None:
    answer = _raw(limited_endpoint, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                    b"Expect: 100-continue\r\n"
                                    b"Content-Length: " + str(serve.MAX_REQUEST_BYTES + 1).encode() + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer  # no "100 Continue" first: the body is never sent


def test_a_50_mb_upload_reads_413_not_a_connection_reset(limited_endpoint) -> None:
    import http.client

    connection = http.client.HTTPConnection(*limited_endpoint, timeout=30)
    body = bytes(50 * 1024 * 1024)
    # The server may stop reading the body before it is all sent; its answer is on the way regardless.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        connection.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    assert response.status == 413 and b"limit" in response.read()


def test_at_most_max_decodes_requests_decode_at_once(limited_endpoint, sample_photo: bytes, monkeypatch) -> None:
    import time

    from ml import inference

    decode, busy, most = inference.input_fn, [0], [0]
    guard = threading.Lock()

    def slow_decode(*args: object) -> object:
        with guard:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            time.sleep(0.3)
            return decode(*args)
        finally:
            with guard:
                busy[0] -= 1

    monkeypatch.setattr(inference, "input_fn", slow_decode)
    url = f"http://{limited_endpoint[0]}:{limited_endpoint[1]}"
    statuses: list[int] = []
    clients = [threading.Thread(target=lambda: statuses.append(_post(url, sample_photo, "image/jpeg")[0]))
               for _ in range(6)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(60)
    assert statuses == [200] * 6
    assert most[0] == 2
