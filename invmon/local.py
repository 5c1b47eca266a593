"""The offline backend: local stand-ins for the AWS services, started and always stopped by the caller.

- :class:`MotoServer` runs moto's S3/DynamoDB/SQS/EventBridge server on 127.0.0.1 and points boto3 at it
  through ``AWS_ENDPOINT_URL``, so the Lambda code runs unchanged.
- :class:`LocalEndpoint` runs ``python -m ml.serve`` (SageMaker's ``/ping`` and ``/invocations``) in a child
  process and points boto3's ``sagemaker-runtime`` client at it through ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``.

Children run in their own process group and are terminated (then killed) on exit, on error and on Ctrl-C, so no
process or port is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

LOOPBACK = "127.0.0.1"
# Fake credentials: the stand-ins accept anything, and real ones must never be used by the offline run.
OFFLINE_ENV = {
    "AWS_ACCESS_KEY_ID": "offline",
    "AWS_SECRET_ACCESS_KEY": "offline",
    "AWS_SESSION_TOKEN": "offline",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "POWERTOOLS_METRICS_NAMESPACE": "invmon-offline",
    # The handlers' structured logs and metric documents would drown the progress output; errors still show.
    "POWERTOOLS_LOG_LEVEL": "ERROR",
    "POWERTOOLS_METRICS_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_http(url: str, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if the serving process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with status {process.returncode} before it answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


class ChildProcess:
    """A child in its own process group, stopped with SIGTERM then SIGKILL; usable as a context manager."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: IO[str] | int | None = None,
    ) -> None:
        self.args = list(args)
        self.process = subprocess.Popen(
            self.args,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            text=True,
            # Own session: Ctrl-C reaches only us, and we decide how the child stops.
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, grace: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace)

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class MotoServer:
    """moto's server in this process, on a free loopback port, with boto3 pointed at it while open."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._server = None
        self._env: contextlib.ExitStack | None = None

    def __enter__(self) -> MotoServer:
        from moto.server import ThreadedMotoServer

        # One request line per S3 call would bury the progress output.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
        self._server.start()
        self._env = contextlib.ExitStack()
        self._env.enter_context(patched_environ(OFFLINE_ENV | {"AWS_ENDPOINT_URL": self.url}))
        wait_for_http(f"{self.url}/moto-api/", timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._env is not None:
            self._env.close()
        if self._server is not None:
            self._server.stop()


class LocalEndpoint:
    """``ml/inference.py`` served over HTTP by ``python -m ml.serve``, as a SageMaker endpoint would be."""

    def __init__(self, model_dir: Path, *, log: IO[str] | int | None = subprocess.DEVNULL) -> None:
        self.model_dir = Path(model_dir)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._log = log
        self._child: ChildProcess | None = None
        self._env: contextlib.ExitStack | None = None

    def __enter__(self) -> LocalEndpoint:
        self._child = ChildProcess(
            [sys.executable, "-m", "ml.serve", "--model-dir", str(self.model_dir), "--port", str(self.port)],
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
            stdout=self._log,
        )
        try:
            wait_for_http(f"{self.url}/ping", timeout=120, process=self._child.process)
        except BaseException:
            self._child.stop()
            raise
        self._env = contextlib.ExitStack()
        self._env.enter_context(patched_environ({"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": self.url}))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._env is not None:
            self._env.close()
        if self._child is not None:
            self._child.stop()
