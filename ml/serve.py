"""A local endpoint speaking SageMaker's container protocol around ``ml.inference``.

``python -m ml.serve --model-dir DIR --port N`` answers ``GET /ping`` (200 once the model is loaded) and
``POST /invocations`` (Content-Type and Accept as SageMaker passes them). A request the model cannot
answer gets its 4xx status and ``{"error": "<message>"}``; anything unexpected a 500 with the message,
and the server keeps serving.

It also answers ``POST /endpoints/<name>/invocations`` the way the SageMaker Runtime API in front of a
container does, so boto3's ``invoke_endpoint`` (pointed here with ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``)
works unchanged: a container error comes back as HTTP 424 ``ModelError`` carrying the container's status
and message (``OriginalStatusCode``, ``OriginalMessage``).
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


def make_handler(model: inference.LoadedModel) -> type[BaseHTTPRequestHandler]:
    # One model, many threads: torch's CPU kernels already use every core, so requests take turns.
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "invmon-serve"

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

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self._send(400, {"error": "Content-Length is not a number"})
                return
            if length > MAX_REQUEST_BYTES:
                self.close_connection = True
                self._send(413, {"error": f"body is {length} bytes; the limit is {MAX_REQUEST_BYTES}"})
                return
            body = self.rfile.read(length) if length else b""
            if self.path.rstrip("/") != "/invocations" and not RUNTIME_PATH.match(self.path):
                # Read first: a body left unread would be parsed as the next request on this connection.
                self._send(404, {"error": f"no such path {self.path}"})
                return
            try:
                with lock:
                    data = inference.input_fn(body, self.headers.get("Content-Type"))
                    prediction = inference.predict_fn(data, model)
                answer = inference.output_fn(prediction, self.headers.get("Accept"))
            except inference.BadRequest as error:
                self._send(error.status_code, {"error": error.message})
                return
            except Exception as error:
                self._send(500, {"error": f"{type(error).__name__}: {error}"})
                return
            self._send(200, answer)

    return Handler


def make_server(model_dir: Path, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    model = inference.model_fn(str(model_dir))
    return ThreadingHTTPServer((host, port), make_handler(model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    server = make_server(args.model_dir, args.host, args.port)
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
