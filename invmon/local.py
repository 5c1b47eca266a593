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

from invmon import lifeline

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
        command, pass_fds, environment = self.args, (), dict(env if env is not None else os.environ)
        if len(self.args) > 2 and self.args[0] == sys.executable and self.args[1] in ("-m", "-c"):
            # A Python child watches a pipe from us and stops its process group when we are gone, even killed
            # (invmon/lifeline.py), from before its own start-up.
            fd = lifeline.read_end()
            command, pass_fds = [sys.executable, "-m", "invmon.lifeline", *self.args[1:]], (fd,)
            environment[lifeline.FD_VARIABLE] = str(fd)
        self.process = subprocess.Popen(
            command,
            env=environment,
            cwd=cwd,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            text=True,
            pass_fds=pass_fds,
            # Own session: Ctrl-C reaches only us, and we decide how the child stops.
            start_new_session=True,
        )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, grace: float = 10.0) -> None:
        _LIVE.discard(self)
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


# Every child not stopped yet, whichever thread started it: an endpoint still starting up in the interpreter's
# thread when Ctrl-C arrives is in no one else's list yet.
_LIVE: set[ChildProcess] = set()


def stop_all_children() -> None:
    """Stop every child this process started and has not stopped (the demo's last cleanup)."""
    for child in list(_LIVE):
        child.stop()


class MotoServer:
    """moto's server in this process, on a free loopback port, with boto3 pointed at it while open. With ``log``,
    moto's own logging and the tracebacks of its threads (a request cut short by Ctrl-C, an interpreter error)
    go to that file instead of the terminal."""

    def __init__(self, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log = log
        self._server = None
        self._env: contextlib.ExitStack | None = None

    def __enter__(self) -> MotoServer:
        from moto.server import ThreadedMotoServer

        # One request line per S3 call would bury the progress output.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        # moto's ASL parser warns on every ToleratedFailurePercentage it reads (it ignores them: one of the gaps
        # invmon/execution.py lists and works around), four times per execution.
        logging.getLogger("moto.stepfunctions.parser.asl.parse.preprocessor").setLevel(logging.ERROR)

        self._env = contextlib.ExitStack()
        if self.log is not None:
            self._env.enter_context(_logs_to(self.log, ("moto", "werkzeug")))
        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
        self._server.start()
        self._env.enter_context(patched_environ(OFFLINE_ENV | {"AWS_ENDPOINT_URL": self.url}))
        wait_for_http(f"{self.url}/moto-api/", timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.stop()
        if self._env is not None:
            self._env.close()


@contextlib.contextmanager
def _logs_to(path: Path, loggers: Sequence[str]) -> Iterator[None]:
    """Send these loggers, and uncaught exceptions in threads other than the main one, to ``path`` while open."""
    import threading

    stream = open(path, "a")  # noqa: SIM115 (closed below, after the handlers are removed)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate))
        logger.addHandler(handler)
        logger.propagate = False
    previous_hook = threading.excepthook

    def to_log(args: threading.ExceptHookArgs) -> None:
        import traceback

        stream.write(f"exception in thread {args.thread.name if args.thread else '?'}:\n")
        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback, file=stream)
        stream.flush()

    threading.excepthook = to_log
    try:
        yield
    finally:
        threading.excepthook = previous_hook
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
        stream.close()


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


class LocalEndpoints:
    """Serves every SageMaker endpoint that moto holds with ``python -m ml.serve``: the model its endpoint config
    names (CreateModel's ModelDataUrl, a model.tar.gz) is downloaded and unpacked, and boto3's
    ``sagemaker-runtime`` is pointed at the server. ``sync`` is called after each step that may have created or
    updated an endpoint; an endpoint whose model cannot be served is put in ``Failed`` with the reason, as
    SageMaker reports a container that never answers its ping."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.served: dict[str, tuple[str, LocalEndpoint]] = {}  # endpoint -> (endpoint config, server)
        self._logs = contextlib.ExitStack()

    def sync(self) -> list[str]:
        """Starts (or restarts, for an update) a server for each endpoint whose config is not served yet;
        returns what it did, for people."""
        import boto3

        sagemaker = boto3.client("sagemaker")
        done = []
        for summary in sagemaker.list_endpoints()["Endpoints"]:
            name = summary["EndpointName"]
            config = sagemaker.describe_endpoint(EndpointName=name)["EndpointConfigName"]
            if name in self.served and self.served[name][0] == config:
                continue
            try:
                model_dir = self._model_dir(sagemaker, name, config)
                self.stop(name)
                # Open while its server runs; close() closes it.
                log = self._logs.enter_context(open(self.workdir / f"endpoint-{name}.log", "a"))  # noqa: SIM115
                server = LocalEndpoint(model_dir, log=log).__enter__()
            except Exception as error:  # any failure is the endpoint's own, reported as SageMaker reports one
                from invmon.execution import set_endpoint_status

                set_endpoint_status(name, "Failed", f"the model could not be served here: {error}"[:1024])
                done.append(f"endpoint {name}: Failed ({error})")
                continue
            self.served[name] = (config, server)
            done.append(f"endpoint {name} ({config}) served by ml.serve on {server.url} from {model_dir}")
        return done

    def _model_dir(self, sagemaker: object, name: str, config: str) -> Path:
        import tarfile

        import boto3

        variants = sagemaker.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]  # type: ignore[attr-defined]
        model = sagemaker.describe_model(ModelName=variants[0]["ModelName"])  # type: ignore[attr-defined]
        container = model.get("PrimaryContainer") or model["Containers"][0]
        uri = container["ModelDataUrl"]
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        folder = self.workdir / "endpoints" / name / config
        folder.mkdir(parents=True, exist_ok=True)
        archive = folder.with_suffix(".tar.gz")
        boto3.client("s3").download_file(bucket, key, str(archive))
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        return folder

    def stop(self, name: str) -> None:
        if name in self.served:
            self.served.pop(name)[1].__exit__(None, None, None)

    def close(self) -> None:
        for name in list(self.served):
            self.stop(name)
        self._logs.close()
