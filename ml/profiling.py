"""Step timing for the health checks, and ``--profile-steps N``: a PyTorch profiler trace plus a stage table.

Every step is split into stages by :meth:`StepProbe.mark` (data, forward, backward, optimizer). Outside the
profiled window a mark only reads the clock, so the data-wait share the health checks use costs nothing. For
the ``N`` profiled steps each mark also waits for the device (``torch.cuda.synchronize``), so a stage's time is
its real device time rather than its launch time, and the stages appear as named ranges in the trace.

Output, in the job's output directory (``output.tar.gz``):

- ``profiler/*.pt.trace.json.gz``: Chrome trace format, opened by TensorBoard's profiler plugin
  (``tensorboard --logdir profiler``) or by ui.perfetto.dev;
- ``profile.json`` and ``profile.txt``: mean milliseconds and share of step time per stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

STAGES = ("data", "forward", "backward", "optimizer")
PROFILE_DIR = "profiler"
PROFILE_JSON = "profile.json"
PROFILE_TABLE = "profile.txt"
# Steps skipped before recording: the first ones pay for lazy initialisation (cuDNN autotuning, allocator).
WAIT_STEPS, WARMUP_STEPS = 1, 1


class StepProbe:
    """Marks the stages of each training step; profiles ``profile_steps`` of them when asked."""

    def __init__(self, device: torch.device, profile_steps: int = 0, output_dir: str | Path | None = None) -> None:
        self.device = device
        self.profile_steps = profile_steps
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._profiler: torch.profiler.profile | None = None
        self._steps_seen = 0
        self._range: Any = None
        self._last = self._started = 0.0
        self._timings: dict[str, float] = {}
        self.recorded: list[dict[str, float]] = []
        if profile_steps > 0:
            if self.output_dir is None:
                raise ValueError("profiling needs an output directory")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=profile_steps,
                                                 repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.output_dir / PROFILE_DIR),
                                                                        use_gzip=True),
            )
            self._profiler.start()

    @property
    def recording(self) -> bool:
        """True during the steps whose stages are recorded (after the profiler's wait and warm-up steps)."""
        first = WAIT_STEPS + WARMUP_STEPS
        return self._profiler is not None and first <= self._steps_seen < first + self.profile_steps

    def begin(self) -> None:
        self._timings = {}
        self._sync()
        self._last = self._started = time.perf_counter()
        self._open(STAGES[0])

    def mark(self, stage: str) -> None:
        """The stage ``stage`` ends now (and the next one in :data:`STAGES` starts)."""
        self._sync()
        now = time.perf_counter()
        self._timings[stage] = self._timings.get(stage, 0.0) + now - self._last
        self._last = now
        following = STAGES.index(stage) + 1 if stage in STAGES else len(STAGES)
        self._open(STAGES[following] if following < len(STAGES) else None)

    def _open(self, stage: str | None) -> None:
        """Name the profiler's range for the stage that starts (ranges are what the trace shows per stage)."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if stage is not None and self.recording:
            self._range = torch.profiler.record_function(f"step/{stage}")
            self._range.__enter__()

    def end(self) -> dict[str, float]:
        """Close the step: its stage times in seconds, plus ``total`` (wall time since :meth:`begin`, including
        any wait for the device after the last mark)."""
        self._open(None)
        timings = dict(self._timings)
        timings["total"] = time.perf_counter() - self._started
        if self.recording:
            self.recorded.append(timings)
        if self._profiler is not None:
            self._steps_seen += 1
            self._profiler.step()
            if self._steps_seen >= WAIT_STEPS + WARMUP_STEPS + self.profile_steps:
                self.close()
        return timings

    def _sync(self) -> None:
        if self.recording and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> dict[str, Any] | None:
        """Stop the profiler (the trace handler writes the trace) and write the stage table; None when nothing
        was recorded."""
        if self._profiler is None:
            return None
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        if not self.recorded:
            return None
        table = stage_table(self.recorded)
        assert self.output_dir is not None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / PROFILE_JSON).write_text(json.dumps(table, indent=2) + "\n")
        text = format_table(table)
        (self.output_dir / PROFILE_TABLE).write_text(text + "\n")
        print(text, flush=True)
        return table


def stage_table(steps: list[dict[str, float]]) -> dict[str, Any]:
    """Mean milliseconds and share of the step per stage over the recorded steps."""
    n = len(steps)
    total = sum(step["total"] for step in steps) / n
    stages = {}
    for stage in STAGES:
        mean = sum(step.get(stage, 0.0) for step in steps) / n
        stages[stage] = {"ms": round(mean * 1000, 3), "share": round(mean / total, 4) if total else 0.0}
    return {"steps": n, "step_ms": round(total * 1000, 3), "stages": stages}


def format_table(table: dict[str, Any]) -> str:
    lines = [f"profile of {table['steps']} steps: {table['step_ms']:.1f} ms per step",
             f"{'stage':<10} {'ms':>10} {'share':>7}"]
    for stage, row in table["stages"].items():
        lines.append(f"{stage:<10} {row['ms']:>10.1f} {row['share']:>7.1%}")
    return "\n".join(lines)
