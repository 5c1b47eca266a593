"""A local endpoint speaking SageMaker's container protocol around ``ml.inference``.

``python -m ml.serve --model-dir DIR --port N`` answers ``GET /ping`` (200 once the model is loaded) and
``POST /invocations`` (Content-Type and Accept as SageMaker passes them). A request the model cannot
answer gets its 4xx status and ``{"error": "<message>"}``; anything unexpected a 500 with the message,
and the server keeps serving.

It also answers ``POST /endpoints/<name>/invocations`` the way the SageMaker Runtime API in front of a
container does, so boto3's ``invoke_endpoint`` (pointed here with ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``)
works unchanged: a container error comes back as HTTP 424 ``ModelError`` carrying the container's status
and message (``OriginalStatusCode``, ``OriginalMessage``).

A body comes with one ``Content-Length`` (a negative, malformed or repeated one is a 400) or
``Transfer-Encoding: chunked`` (any other coding is a 501), never both; a client that stops sending is cut off
after ``--read-timeout`` seconds, and one that keeps sending a byte now and then after ``--request-deadline``
seconds for the whole request (a 408). A body over the limit is refused with 413 before it is read: at once for a
client that asks ``Expect: 100-continue``, otherwise after which the rest is drained for a moment so that the
client reads the 413 instead of a connection reset. Images are decoded outside the model's lock, at most
``--max-decodes`` at a time, so memory stays bounded however many clients send at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ml import inference

# Bodies above this are refused before they are read into memory.
MAX_REQUEST_BYTES = inference.MAX_BODY_BYTES * 2
# A client that opens a connection and then sends nothing (or half a body) is dropped after this long.
READ_TIMEOUT_SECONDS = 30.0
# The whole request (line, headers and body) must arrive within this long, however it trickles in (slowloris).
# SageMaker gives a real-time invocation 60 s in all (InvokeEndpoint's model response timeout), so a request
# still arriving after that could never be answered in time anyway.
REQUEST_DEADLINE_SECONDS = 60.0
# Decoded images (and their tensors) are what grow memory: at most this many requests decode and predict at once.
MAX_CONCURRENT_DECODES = 2
# After refusing a body unread, read and drop at most this much of it, for at most DRAIN_SECONDS, so the client
# sees the answer rather than a reset (closing a socket with unread input makes the kernel send RST).
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 2.0
RUNTIME_PATH = re.compile(r"^/endpoints/[A-Za-z0-9-]{1,63}/invocations/?$")
MODEL_ERROR_TYPE = "ModelError:http://internal.amazon.com/coral/com.amazonaws.sagemaker/"


def runtime_error(status: int, message: str) -> tuple[int, dict, dict[str, str]]:
    """How SageMaker Runtime reports a container's error status to the caller."""
    kind = "CLIENT" if status < 500 else "SERVER"
    document = {
        "ErrorCode": f"{kind}_ERROR_FROM_MODEL",
        "OriginalStatusCode": status,
        "OriginalMessage": message,
        "Message": f'Received {kind.lower()} error ({status}) from primary with message "{message}".',
    }
    return 424, document, {"x-amzn-ErrorType": MODEL_ERROR_TYPE}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def make_handler(model: inference.LoadedModel, read_timeout: float = READ_TIMEOUT_SECONDS, *,
                 request_deadline: float = REQUEST_DEADLINE_SECONDS,
                 max_decodes: int = MAX_CONCURRENT_DECODES) -> type[BaseHTTPRequestHandler]:
    # One model, many threads: torch's CPU kernels already use every core, so predictions take turns; decoding
    # (Pillow releases the GIL) happens outside the lock, a few at a time.
    lock = threading.Lock()
    decodes = threading.BoundedSemaphore(max_decodes)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "invmon-serve"
        timeout = read_timeout  # socketserver sets it on the connection: every read waits at most this long

        def handle_one_request(self) -> None:
            # The deadline runs from the first byte we wait for to the end of the body; past it, reading is shut
            # off (reads return end-of-file) and the request ends in a 408 or a closed connection.
            self.late = False
            self.deadline = threading.Timer(request_deadline, self._cut_off)
            self.deadline.daemon = True
            self.deadline.start()
            try:
                super().handle_one_request()
            finally:
                self.deadline.cancel()

        def _cut_off(self) -> None:
            self.late = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RD)

        def handle_expect_100(self) -> bool:
            """``Expect: 100-continue``: refuse an oversized body before the client sends it."""
            try:
                self._check_framing()
            except _Refused as refused:
                self.close_connection = True
                self._send(refused.status, {"error": refused.message})
                return False
            return super().handle_expect_100()

        def _drain(self) -> None:
            """Read and drop what the client is still sending of a refused body, briefly, then stop."""
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.2)
                dropped, until = 0, time.monotonic() + DRAIN_SECONDS
                while dropped < DRAIN_BYTES and time.monotonic() < until:
                    chunk = self.connection.recv(65536)
                    if not chunk:
                        break
                    dropped += len(chunk)

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

        def _send(self, status: int, document: dict | str, headers: dict[str, str] | None = None) -> None:
            if status >= 400 and RUNTIME_PATH.match(self.path) and isinstance(document, dict):
                status, document, headers = runtime_error(status, document.get("error", ""))
            body = (document if isinstance(document, str) else json.dumps(document)).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/ping":
                self._send(200, {"status": "healthy", "model": model.config.model_id or model.config.model_name})
            else:
                self._send(404, {"error": f"no such path {self.path}"})

        def _read_chunked(self) -> bytes:
            body = bytearray()
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _Refused(400, "malformed chunk size in a chunked body") from None
                if size < 0 or len(body) + size > MAX_REQUEST_BYTES:
                    raise _Refused(413, f"body is over the limit of {MAX_REQUEST_BYTES} bytes")
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailer fields, up to the blank line
                        pass
                    return bytes(body)
                chunk = self.rfile.read(size)
                if len(chunk) < size or self.rfile.read(2) != b"\r\n":
                    raise _Refused(400, "chunked body ended early or without CRLF after a chunk")
                body += chunk

        def _check_framing(self) -> tuple[bool, int | None]:
            """(chunked, declared length) from the headers, or the refusal (RFC 9112 section 6)."""
            codings = [c.strip().lower() for value in self.headers.get_all("Transfer-Encoding") or []
                       for c in value.split(",") if c.strip()]
            lengths = self.headers.get_all("Content-Length") or []
            if codings and codings != ["chunked"]:
                raise _Refused(501, f"Transfer-Encoding {', '.join(codings)} is not supported; send the body "
                                    "plain or chunked")
            if codings and lengths:
                raise _Refused(400, "a body has a Content-Length or Transfer-Encoding: chunked, not both")
            if len(lengths) > 1:
                raise _Refused(400, f"{len(lengths)} Content-Length headers; a request has one")
            if not lengths:
                return bool(codings), None
            declared = lengths[0]
            if not (declared.strip().isascii() and declared.strip().isdigit()):
                raise _Refused(400, f"Content-Length is not a non-negative number: {declared[:40]!r}")
            length = int(declared)
            if length > MAX_REQUEST_BYTES:
                raise _Refused(413, f"body is {length} bytes; the limit is {MAX_REQUEST_BYTES}")
            return False, length

        def _read_body(self) -> bytes:
            chunked, length = self._check_framing()
            if chunked:
                body = self._read_chunked()
            else:
                body = self.rfile.read(length) if length else b""
                if len(body) < (length or 0):
                    raise _Refused(400, f"body ended after {len(body)} of {length} bytes")
            if self.late:
                raise _Refused(408, f"the request did not arrive within {request_deadline:.0f} s")
            self.deadline.cancel()
            return body

        def do_POST(self) -> None:
            try:
                body = self._read_body()
            except _Refused as error:
                late = _Refused(408, f"the request did not arrive within {request_deadline:.0f} s")
                refused = late if self.late else error
                # What is left of the body cannot be told from the next request: this connection ends here.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self._send(refused.status, {"error": refused.message})
                    self._drain()
                return
            except TimeoutError:
                self.close_connection = True
                return
            if self.path.rstrip("/") != "/invocations" and not RUNTIME_PATH.match(self.path):
                # Read first: a body left unread would be parsed as the next request on this connection.
                self._send(404, {"error": f"no such path {self.path}"})
                return
            try:
                inference.check_accept(self.headers.get("Accept"))  # a 406 before any decoding
                with decodes:
                    data = inference.input_fn(body, self.headers.get("Content-Type"))
                    with lock:
                        prediction = inference.predict_fn(data, model)
                    del data
                answer = inference.output_fn(prediction, self.headers.get("Accept"))
            except inference.BadRequest as error:
                self._send(error.status_code, {"error": error.message})
                return
            except Exception as error:
                self._send(500, {"error": inference.public_message(error)})
                return
            self._send(200, answer)

    return Handler


def make_server(model_dir: Path, host: str = "127.0.0.1", port: int = 8080,
                read_timeout: float = READ_TIMEOUT_SECONDS, *, request_deadline: float = REQUEST_DEADLINE_SECONDS,
                max_decodes: int = MAX_CONCURRENT_DECODES) -> ThreadingHTTPServer:
    model = inference.model_fn(str(model_dir))
    return ThreadingHTTPServer((host, port), make_handler(model, read_timeout, request_deadline=request_deadline,
                                                          max_decodes=max_decodes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_SECONDS,
                        help="seconds a client may take to send its request")
    parser.add_argument("--request-deadline", type=float, default=REQUEST_DEADLINE_SECONDS,
                        help="seconds a client may take to send a whole request")
    parser.add_argument("--max-decodes", type=int, default=MAX_CONCURRENT_DECODES,
                        help="requests decoded and predicted at once (bounds memory)")
    args = parser.parse_args(argv)
    server = make_server(args.model_dir, args.host, args.port, args.read_timeout,
                         request_deadline=args.request_deadline, max_decodes=args.max_decodes)
    print(f"serving {args.model_dir} on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
