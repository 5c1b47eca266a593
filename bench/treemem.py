"""``python -m bench.treemem [--json FILE] -- COMMAND...``: run a command and report its process tree's peak
memory and wall time (the README's demo figures: ``python -m bench.treemem -- .venv/bin/invmon demo``).

Every 0.5 s it sums, over the command and every process it started (children in their own sessions included: the
tree is followed by parent pid), the resident set (RSS, which counts pages shared between processes once per
process) and the proportional set (PSS from /proc/<pid>/smaps_rollup, which splits shared pages between their
users, so the sum is what the tree really holds). Linux only. The machine's load average is recorded at the
start and the end: other work on the same cores stretches the time, not the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _memory(pid: int) -> tuple[int, int, str]:
    """(RSS, PSS) in bytes and the command line of one process; zeros once it is gone."""
    try:
        rollup = (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines()
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup[1:] if line.endswith("kB")}
        command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except (OSError, ValueError, IndexError):
        return 0, 0, ""
    return fields.get("Rss", 0), fields.get("Pss", 0), command


def sample(root: int) -> tuple[int, int, dict[str, int]]:
    tree, pids, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack += tree.get(pid, [])
    rss = pss = 0
    by_command: dict[str, int] = {}
    for pid in pids:
        r, p, command = _memory(pid)
        rss, pss = rss + r, pss + p
        key = " ".join(command.split()[:5])
        by_command[key] = by_command.get(key, 0) + r
    return rss, pss, by_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.treemem", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    load_start = os.getloadavg()
    started = time.monotonic()
    process = subprocess.Popen(command)
    peak_rss = peak_pss = 0
    peak_by: dict[str, int] = {}
    while process.poll() is None:
        rss, pss, by_command = sample(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        for key, value in by_command.items():
            peak_by[key] = max(peak_by.get(key, 0), value)
        time.sleep(0.5)
    figures = {
        "command": command, "status": process.returncode, "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(peak_rss / 2**20), "peak_pss_mb": round(peak_pss / 2**20),
        "load_average_start": [round(x, 1) for x in load_start],
        "load_average_end": [round(x, 1) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "peak_rss_mb_by_command": {k: round(v / 2**20) for k, v in sorted(peak_by.items(), key=lambda kv: -kv[1])
                                   if v > 20 * 2**20},
    }
    print(json.dumps(figures, indent=2), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
