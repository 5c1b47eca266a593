"""The ``invmon`` command: the offline demo, the local trainer, and the tools that drive a deployed stack."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from invmon import aws
from invmon.table import render_table

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "abid-sample"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (``invmon demo: --epochs: ...``) and exit status 2, with
    ``invmon <command> --help`` for the rest, instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


def _at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {value}")
        return value

    parse.__name__ = "number"
    return parse


def _folder(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder (expected an ABID folder with bin-images/ "
                                         "and metadata/)")
    return path


def _assignment(text: str) -> str:
    name, sep, _ = text.partition("=")
    if not sep or not re.fullmatch(r"-{0,2}[A-Za-z][A-Za-z0-9_-]*", name.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE such as lr=0.001, got {text!r}")
    return text


def default_local_workdir() -> Path:
    """Where ``invmon train --local`` writes when not told: the user's cache, never the checkout (a run's
    channels and model would otherwise land in the repository). One folder per run."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "invmon" / "train-local" / time.strftime("%Y%m%dT%H%M%S")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="invmon", description="Count the objects in warehouse bin photos.")
    parser.add_argument("--version", action="version", version="invmon 0.1.0")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole system offline on this machine (no AWS account)")
    demo.add_argument("--data", type=_folder, default=SAMPLE_DIR, help="an ABID-layout folder (default: the sample)")
    demo.add_argument("--epochs", type=_at_least(1), default=None, help="training epochs (default: fits the data size)")
    demo.add_argument("--workdir", type=Path, default=None, help="where to keep the run (default: a temporary folder)")
    demo.add_argument("--keep", action="store_true", help="keep the work folder (model, reports, plots) afterwards")
    demo.add_argument("--hold-out", type=_at_least(1), default=12,
                      help="photos kept out of training and uploaded for counting (at least 1)")

    train = commands.add_parser("train", help="train a counting model")
    train.add_argument("--local", action="store_true", required=True, help="on this machine (SageMaker's contract)")
    train.add_argument("--data", type=_folder, default=SAMPLE_DIR, help="an ABID-layout folder")
    train.add_argument("--workdir", type=Path, default=None,
                       help="channels, model and output go here (default: ~/.cache/invmon/train-local/<time>)")
    train.add_argument("--epochs", type=_at_least(1), default=3)
    train.add_argument("--hyperparameter", "-p", action="append", default=[], metavar="NAME=VALUE", type=_assignment,
                       help="any other ml.train hyperparameter, e.g. -p lr=0.001 (repeatable)")

    pipeline = commands.add_parser("pipeline", help="start or follow the deployed pipeline")
    pipeline_commands = pipeline.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = pipeline_commands.add_parser("start", help="start an execution ({} = every default)")
    start.add_argument("--input", type=Path, help="a JSON file with the execution input")
    start.add_argument("--name", help="execution name (default: generated)")
    status = pipeline_commands.add_parser("status", help="the steps of an execution and their progress")
    status.add_argument("--execution", help="execution ARN (default: the latest)")
    status.add_argument("--watch", action="store_true", help="refresh until the execution ends")
    status.add_argument("--verbose", action="store_true", help="print a failed step's whole cause, not only the reason")

    count = commands.add_parser("count", help="count photos with the deployed system")
    count.add_argument("photos", nargs="+", type=Path)
    count.add_argument("--expected", type=int, help="what the bin should hold (stored with the upload)")
    count.add_argument("--direct", action="store_true", help="invoke the endpoint directly instead of uploading")
    count.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each count")

    costs = commands.add_parser("costs", help="the latest cost report")
    costs.add_argument("--refresh", action="store_true", help="run the report now before showing it")

    dlq = commands.add_parser("dlq", help="uploads that could not be counted: list them, or redrive after a fix")
    dlq.add_argument("action", choices=("list", "redrive"))
    dlq.add_argument("--limit", type=_at_least(1), default=100, help="messages to list at most")

    review = commands.add_parser("review", help="the review loop: try the page locally, or the audit's figures")
    review_commands = review.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = review_commands.add_parser("serve", help="the review page on 127.0.0.1 against the demo's backend")
    serve.add_argument("--data", type=Path, default=SAMPLE_DIR, help="an ABID-layout folder (default: the sample)")
    serve.add_argument("--no-browser", action="store_true", help="print the address instead of opening it")
    review_stats = review_commands.add_parser("stats", help="audit precision of counted/match, consignments caught")

    for sub in (start, status, count, costs, dlq, review_stats):
        sub.add_argument("--stage", default=aws.DEFAULT_STAGE,
                         help="the stage deployed with -c stage=...: its stack is Invmon-<stage> (default dev)")
        sub.add_argument("--stack", default=None, help=f"stack name (default from --stage: {aws.DEFAULT_STACK})")
        sub.add_argument("--region", default=None,
                         help="AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, then the profile's)")
        sub.add_argument("--profile", default=None, help="AWS profile from ~/.aws/config (default: AWS_PROFILE)")
    return parser


def _pipeline(args: argparse.Namespace, deployment: aws.Deployment) -> int:
    if args.action == "start":
        execution_input: dict[str, Any] = _read_input(args.input) if args.input else {}
        if not isinstance(execution_input, dict):
            raise aws.CliError(f"{args.input}: the execution input must be a JSON object")
        arn = aws.start_pipeline(deployment, execution_input, args.name)
        print(f"started {arn}\nfollow it with: invmon pipeline status --watch --execution {arn}")
        return 0
    arn = args.execution or aws.latest_execution(deployment)
    status = "RUNNING"
    for status, steps in aws.watch_execution(deployment, arn) if args.watch else [
        aws.execution_progress(deployment, arn)
    ]:
        rows = [[s.name, s.status, f"{s.seconds:,.0f} s", s.detail[:80]] for s in steps]
        print(f"\n{arn}: {status}")
        failed = [s for s in steps if s.status == "failed"]
        for step in failed:  # the reason first: the table cuts it, and the cause can be kilobytes of JSON
            print(f"failed at {step.name}: {step.detail}")
        print(render_table(["step", "status", "time", "detail"], rows))
        for step in failed if args.verbose else []:
            print(f"\ncause of {step.name}, in full:\n{_pretty(step.cause)}")
        if failed and not args.verbose:
            print("(the whole cause: add --verbose)")
    return 0 if status in {"SUCCEEDED", "RUNNING"} else 1


def _read_input(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise aws.CliError(f"{path}: no such file; --input takes a JSON file such as {_INPUT_EXAMPLE}") from None
    except OSError as error:
        raise aws.CliError(f"{path}: cannot read it ({error.strerror})") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise aws.CliError(f"{path}: not JSON ({error}); the execution input is a JSON object such as "
                           f"{_INPUT_EXAMPLE}") from None


_INPUT_EXAMPLE = '{"training": {"epochs": 5}}'


def _pretty(cause: str) -> str:
    """A cause's JSON indented (after any "<stage> stage failed: " prefix), or the cause as it is."""
    prefix, brace, rest = cause.partition("{")
    try:
        return prefix + json.dumps(json.loads(brace + rest), indent=2) if brace else cause
    except ValueError:
        return cause


def _count(args: argparse.Namespace, deployment: aws.Deployment) -> int:
    rows = []
    for photo in args.photos:
        if args.direct:
            answer = aws.invoke_endpoint(deployment, photo)
            rows.append([photo.name, args.expected if args.expected is not None else "", answer["count"],
                         f"{answer['confidence']:.2f}", "direct"])
            continue
        key, version = aws.upload_photo(deployment, photo, expected=args.expected)
        record = aws.wait_for_count(deployment, key, version, timeout=args.timeout)
        rows.append([photo.name, record.get("expectedCount", ""), record.get("count", ""),
                     f"{float(record['confidence']):.2f}" if "confidence" in record else "",
                     record["status"] + (f" ({record['reason']})" if record.get("reason") else "")])
    print(render_table(["photo", "expected", "counted", "confidence", "status"], rows))
    return 0


def _costs(args: argparse.Namespace, deployment: aws.Deployment) -> int:
    report = aws.latest_cost_report(deployment, refresh=args.refresh)
    print(f"{report['project']} {report['start']} .. {report['end']}: {report['total']:.2f} {report['currency']}")
    print(render_table(["service", report["currency"]],
                       [[name, f"{cost:.2f}"] for name, cost in report["by_service"].items()]))
    print(f"spot capacity saved {report['spot_saved_percent']:.1f} % of training time "
          f"over {len(report['training_jobs'])} spot job(s)")
    return 0


def _dlq(args: argparse.Namespace, deployment: aws.Deployment) -> int:
    if args.action == "redrive":
        handle = aws.redrive_dead_letters(deployment)
        print(f"moving the dead letters back to the uploads queue (task {handle}); they are counted again as "
              "they arrive: watch the count Lambda's CountFailures metric")
        return 0
    depth, letters = aws.dead_letters(deployment, limit=args.limit)
    print(f"{depth} message(s) in the count dead-letter queue; the count Lambda's log says why each failed "
          "(search for the key; cause is one of the CountFailures causes)")
    if len(letters) < depth:
        print(f"showing {len(letters)} of about {depth}: see them all with --limit {depth}"
              if len(letters) >= args.limit else
              f"showing {len(letters)} of about {depth}: the others are being received elsewhere right now "
              "(a redrive in progress, or another listing); run it again in a minute")
    print(render_table(["message", "uploads", "receives", "sent"], [
        [letter.message_id, ", ".join(letter.keys), letter.receives,
         letter.sent.isoformat(timespec="seconds") if letter.sent else ""] for letter in letters]))
    return 0


def _review(args: argparse.Namespace, deployment: aws.Deployment) -> int:
    from invmon import review as review_loop

    table = deployment.session.resource("dynamodb").Table(deployment.output("table"))
    return review_loop.print_stats(table)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C's KeyboardInterrupt would be, so every cleanup that Ctrl-C runs
    (children stopped, ports closed, temporary folders removed) runs for them too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = (signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, raise_terminated) for signum in caught}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _signals_as_interrupts():
        return _run(parser, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "demo":
            from invmon.demo import DemoArgumentError, run_demo

            try:
                return run_demo(data=args.data, epochs=args.epochs, workdir=args.workdir, keep=args.keep,
                                hold_out=args.hold_out)
            except DemoArgumentError as error:
                print(f"invmon demo: {error}", file=sys.stderr)
                return 2
        if args.command == "train":
            from invmon.training import train_locally

            return train_locally(data=args.data, workdir=args.workdir or default_local_workdir(), epochs=args.epochs,
                                 extra=args.hyperparameter)
        if args.command == "review" and args.action == "serve":
            from invmon import review as review_loop
            from invmon.demo import SHIPPED_MODEL

            return review_loop.serve(args.data, SHIPPED_MODEL, open_browser=not args.no_browser)
        if args.command is None:
            parser.print_help()
            return 2
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", args.stage):
            print(f"invmon: --stage: expected a stage name such as dev or prod, got {args.stage!r}", file=sys.stderr)
            return 2
        args.stack = aws.stack_name(args.stage) if args.stack is None else args.stack
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,127}", args.stack):
            # A CloudFormation stack name: letters, digits and hyphens, starting with a letter.
            print(f"invmon: --stack: expected a stack name such as {aws.DEFAULT_STACK}, got {args.stack!r}",
                  file=sys.stderr)
            return 2
        deployment = aws.Deployment(stack_name=args.stack,
                                    session=aws.make_session(region=args.region, profile=args.profile))
        handlers = {"pipeline": _pipeline, "count": _count, "costs": _costs, "dlq": _dlq, "review": _review}
        return handlers[args.command](args, deployment)
    except aws.CliError as error:
        print(f"invmon: {error}", file=sys.stderr)
        return 1
    except (BotoCoreError, ClientError) as error:
        print(f"invmon: {aws.explain(error)}", file=sys.stderr)
        return 1
    except Terminated as stop:
        print(f"invmon: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("invmon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
