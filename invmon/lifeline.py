"""Children that end when their parent does, however the parent ends (issue 24: nothing left running).

A child started through :class:`invmon.local.ChildProcess` runs as ``python -m invmon.lifeline -m MODULE ...``
(or ``-c CODE ...``): before the module's own code runs, and so before a slow start-up (torch, the CDK's Node)
begins, a thread blocks reading the read end of a pipe whose only write end the parent holds (``os.pipe`` makes
it non-inheritable, so no other child keeps it open). When the parent exits for any reason, SIGKILL included,
the kernel closes that end, the read returns end-of-file, and the thread stops the child's whole process group
(the child and whatever it started): SIGTERM, then SIGKILL after a grace period.

A pipe rather than Linux's ``PR_SET_PDEATHSIG``: that signal fires when the *thread* that forked the child ends,
and the demo starts endpoints and trainers from worker threads that end long before the demo does
(prctl(2): "the parent-death signal is sent upon subsequent termination of the parent thread"). The pipe works
on every POSIX system as well.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

FD_VARIABLE = "INVMON_LIFELINE_FD"
# How long a child may take to stop after SIGTERM (the trainer checkpoints at its next step) before SIGKILL.
GRACE_SECONDS = 5.0

_pipe: tuple[int, int] | None = None
_lock = threading.Lock()


def read_end() -> int:
    """The parent's side: the pipe's read end, to pass to a child (``pass_fds``); made once per process."""
    global _pipe
    with _lock:
        if _pipe is None or os.getpid() != _owner:
            _set_pipe(os.pipe())
        assert _pipe is not None
        return _pipe[0]


_owner = -1


def _set_pipe(pipe: tuple[int, int]) -> None:
    global _pipe, _owner
    _pipe, _owner = pipe, os.getpid()
    os.set_inheritable(pipe[0], True)  # passed explicitly with pass_fds; the write end stays non-inheritable


def _stop_group() -> None:
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os.killpg(group, signal.SIGKILL)


def watch(fd: int) -> threading.Thread:
    """The child's side: stop this process group once ``fd`` reads end-of-file (the parent is gone)."""

    def wait() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        _stop_group()

    thread = threading.Thread(target=wait, name="invmon-lifeline", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> None:
    """``python -m invmon.lifeline -m MODULE ARGS...`` or ``-c CODE ARGS...``: as ``python`` would run them."""
    fd = os.environ.pop(FD_VARIABLE, None)
    if fd is not None:
        watch(int(fd))
    if len(argv) >= 2 and argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif len(argv) >= 2 and argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.exit("usage: python -m invmon.lifeline (-m MODULE | -c CODE) [ARGS...]")


if __name__ == "__main__":
    main(sys.argv[1:])
