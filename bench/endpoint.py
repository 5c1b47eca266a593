"""``python -m bench.endpoint --model-dir DIR --port N``: ``ml.serve`` reachable the way boto3 calls a
SageMaker endpoint.

boto3's ``invoke_endpoint`` posts to ``/endpoints/<name>/invocations`` on the runtime endpoint URL, while
``ml.serve`` (the container protocol) answers ``/invocations``; this maps the first onto the second and
leaves everything else (model loading, the four serving functions, error statuses) to ``ml.serve``.
"""

from __future__ import annotations

import argparse
import re
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

from ml import inference, serve

RUNTIME_PATH = re.compile(r"^/endpoints/[^/]+/invocations/?$")


def make_server(model_dir: Path, host: str, port: int) -> ThreadingHTTPServer:
    base = serve.make_handler(inference.model_fn(str(model_dir)))

    class Handler(base):  # type: ignore[misc, valid-type]
        def do_POST(self) -> None:
            if RUNTIME_PATH.match(self.path.split("?", 1)[0]):
                self.path = "/invocations"
            super().do_POST()

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.endpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    server = make_server(args.model_dir, args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
