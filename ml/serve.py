"""A local endpoint speaking SageMaker's container protocol around ``ml.inference``.

``python -m ml.serve --model-dir DIR --port N`` answers ``GET /ping`` (200 once the model is loaded) and
``POST /invocations`` (Content-Type and Accept as SageMaker passes them). A request the model cannot
answer gets its 4xx status and ``{"error": "<message>"}``; anything unexpected a 500 with the message,
and the server keeps serving.

It also answers ``POST /endpoints/<name>/invocations`` the way the SageMaker Runtime API in front of a
container does, so boto3's ``invoke_endpoint`` (pointed here with ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``)
works unchanged: a container error comes back as HTTP 424 ``ModelError`` carrying the container's status
and message (``OriginalStatusCode``, ``OriginalMessage``).

A body comes with a ``Content-Length`` (a negative or malformed one is a 400) or ``Transfer-Encoding: chunked``,
never both; a client that stops sending is cut off after ``--read-timeout`` seconds. Images are decoded
outside the model's lock, so one large request does not hold every other one up while it decodes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ml import inference

# Bodies above this are refused before they are read into memory.
MAX_REQUEST_BYTES = inference.MAX_BODY_BYTES * 2
# A client that opens a connection and then sends nothing (or half a body) is dropped after this long.
READ_TIMEOUT_SECONDS = 30.0
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


def make_handler(model: inference.LoadedModel,
                 read_timeout: float = READ_TIMEOUT_SECONDS) -> type[BaseHTTPRequestHandler]:
    # One model, many threads: torch's CPU kernels already use every core, so predictions take turns; decoding
    # (Pillow releases the GIL) happens outside the lock.
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "invmon-serve"
        timeout = read_timeout  # socketserver sets it on the connection: every read waits at most this long

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

        def _read_body(self) -> bytes:
            chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
            declared = self.headers.get("Content-Length")
            if chunked and declared is not None:
                raise _Refused(400, "a body has a Content-Length or Transfer-Encoding: chunked, not both")
            if chunked:
                return self._read_chunked()
            if declared is None:
                return b""
            if not (declared.strip().isascii() and declared.strip().isdigit()):
                raise _Refused(400, f"Content-Length is not a non-negative number: {declared[:40]!r}")
            length = int(declared)
            if length > MAX_REQUEST_BYTES:
                raise _Refused(413, f"body is {length} bytes; the limit is {MAX_REQUEST_BYTES}")
            body = self.rfile.read(length) if length else b""
            if len(body) < length:
                raise _Refused(400, f"body ended after {len(body)} of {length} bytes")
            return body

        def do_POST(self) -> None:
            try:
                body = self._read_body()
            except _Refused as refused:
                # What is left of the body cannot be told from the next request: this connection ends here.
                self.close_connection = True
                self._send(refused.status, {"error": refused.message})
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
                data = inference.input_fn(body, self.headers.get("Content-Type"))
                with lock:
                    prediction = inference.predict_fn(data, model)
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
                read_timeout: float = READ_TIMEOUT_SECONDS) -> ThreadingHTTPServer:
    model = inference.model_fn(str(model_dir))
    return ThreadingHTTPServer((host, port), make_handler(model, read_timeout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_SECONDS,
                        help="seconds a client may take to send its request")
    args = parser.parse_args(argv)
    server = make_server(args.model_dir, args.host, args.port, args.read_timeout)
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
