"""Training health: the checks SageMaker Debugger's built-in rules made, done by the trainer itself.

Debugger is closed to new customers ("we have made the decision to close new customer access to Amazon
SageMaker Debugger, effective 7/30/26", docs.aws.amazon.com/sagemaker/latest/dg/debugger-createtrainingjob-api),
so a default job cannot rely on its rules. The trainer already sees every loss and gradient; these checks cost
one gradient norm per step and no rule-evaluation instance:

- ``non_finite_loss`` (fatal): a NaN or infinite loss. The job stops at the next step with a clear message and
  a non-zero exit, instead of training garbage for hours (Debugger's LossNotDecreasing/ExplodingTensor).
- ``diverging_loss`` (fatal): a step's loss above ``divergence_factor`` times the first step's loss (a learning
  rate of 10 takes this model's loss from 2.8 to 5,000 in one step, still finite; healthy training stays
  within a few times its starting loss, which is about ln(7) plus the expected-count term).
- ``non_finite_gradient`` (fatal without a loss scaler): NaN/inf global gradient norm. With mixed precision the
  scaler skips such steps on purpose and lowers its scale; those are counted, not fatal.
- ``loss_not_decreasing``: the best training loss of the last ``patience`` epochs is no better than before.
- ``overfitting``: validation loss rose for ``patience`` epochs in a row while training loss fell.
- ``vanishing_gradient`` / ``exploding_gradient``: an epoch's median global gradient norm below / above a bound
  (medians, because single spikes are normal early in training).
- ``data_starvation``: the share of step time spent preparing the batch (index, normalise, augment, copy to
  the device) is above a bound, so the device waits for data (Debugger's LowGPUUtilization, seen from inside).

The pure functions take plain numbers; :class:`TrainingMonitor` is fed once per step and once per epoch and
writes ``health.json`` (``write``). Findings are also printed as ``name=value;`` metric lines.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

HEALTH_FILE = "health.json"
Severity = Literal["fatal", "warning"]


@dataclass(frozen=True)
class Thresholds:
    """Where a measurement becomes a finding. The gradient bounds suit this model's global norm (about 0.1-10
    with AdamW on EfficientNet-Lite); the rest are shares and counts that hold for any model."""

    patience: int = 2  # epochs
    min_improvement: float = 0.01  # relative improvement of the training loss that counts as "decreasing"
    vanishing_gradient: float = 1e-6
    exploding_gradient: float = 1e3
    data_wait_share: float = 0.3
    divergence_factor: float = 100.0  # times the loss of the first step this process trained


@dataclass(frozen=True)
class Finding:
    check: str
    severity: Severity
    message: str
    epoch: int | None = None
    step: int | None = None
    value: float | None = None


# --- pure checks ------------------------------------------------------------------------------------------


def is_finite(value: float) -> bool:
    return math.isfinite(value)


def diverging(loss: float, reference: float | None, factor: float) -> bool:
    """True when ``loss`` is more than ``factor`` times the reference (starting) loss."""
    return reference is not None and reference > 0 and loss > factor * reference


def loss_not_decreasing(losses: Sequence[float], patience: int, min_improvement: float) -> bool:
    """True when none of the last ``patience`` epoch losses beats the best earlier one by ``min_improvement``
    (relative). Needs at least ``patience + 1`` epochs."""
    if len(losses) <= patience:
        return False
    best_before = min(losses[:-patience])
    return min(losses[-patience:]) > best_before * (1 - min_improvement)


def overfitting(train_losses: Sequence[float], valid_losses: Sequence[float], patience: int) -> bool:
    """True when, over each of the last ``patience`` epochs, validation loss rose while training loss fell."""
    if len(valid_losses) <= patience or len(train_losses) != len(valid_losses):
        return False
    for i in range(len(valid_losses) - patience, len(valid_losses)):
        if not (valid_losses[i] > valid_losses[i - 1] and train_losses[i] < train_losses[i - 1]):
            return False
    return True


def gradient_state(median_norm: float, thresholds: Thresholds) -> Literal["vanishing", "exploding"] | None:
    if median_norm < thresholds.vanishing_gradient:
        return "vanishing"
    if median_norm > thresholds.exploding_gradient:
        return "exploding"
    return None


def data_wait_share(data_seconds: Sequence[float], step_seconds: Sequence[float]) -> float:
    """Share of step time spent preparing batches; the first step (warm-up, lazy initialisation) left out."""
    data, steps = data_seconds[1:] or data_seconds, step_seconds[1:] or step_seconds
    total = sum(steps)
    return sum(data) / total if total > 0 else 0.0


# --- the monitor ------------------------------------------------------------------------------------------


@dataclass
class _EpochSteps:
    grad_norms: list[float] = field(default_factory=list)
    data_seconds: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    skipped: int = 0  # steps whose gradients were not finite under a loss scaler


class TrainingMonitor:
    """Fed per step (:meth:`step`) and per epoch (:meth:`end_epoch`); ``fatal`` is set by a finding that must
    stop the job. Epoch checks read the trainer's own history, so a resumed job keeps its earlier epochs."""

    def __init__(self, thresholds: Thresholds | None = None, *, log: Callable[..., None] = print) -> None:
        self.thresholds = thresholds or Thresholds()
        self.log = log
        self.findings: list[Finding] = []
        self.epochs: list[dict[str, Any]] = []
        self.fatal: Finding | None = None
        self._current = _EpochSteps()
        # The starting loss: the first step this process trained (after a resume, the first resumed step).
        self.reference_loss: float | None = None

    def step(self, *, epoch: int, step: int, loss: float, grad_norm: float | None, data_seconds: float,
             step_seconds: float, scaled: bool = False) -> Finding | None:
        """Record one step; returns the fatal finding when this step produced one."""
        if self.fatal is not None:
            return None
        if not is_finite(loss):
            return self._fatal(Finding(
                "non_finite_loss", "fatal",
                f"the training loss is {loss} at epoch {epoch + 1} step {step + 1}: training diverged (learning "
                "rate too high, or bad input); stopping instead of training on",
                epoch=epoch + 1, step=step + 1, value=None,
            ))
        if diverging(loss, self.reference_loss, self.thresholds.divergence_factor):
            return self._fatal(Finding(
                "diverging_loss", "fatal",
                f"the training loss {loss:.4g} at epoch {epoch + 1} step {step + 1} is more than "
                f"{self.thresholds.divergence_factor:g} times its starting value {self.reference_loss:.4g}: training "
                "diverged (learning rate too high?); stopping instead of training on",
                epoch=epoch + 1, step=step + 1, value=loss,
            ))
        if self.reference_loss is None:
            self.reference_loss = loss
        if grad_norm is not None and not is_finite(grad_norm):
            if scaled:
                self._current.skipped += 1  # the scaler skips this step and lowers its scale
            else:
                return self._fatal(Finding(
                    "non_finite_gradient", "fatal",
                    f"the global gradient norm is {grad_norm} at epoch {epoch + 1} step {step + 1}: the next "
                    "update would destroy the weights; stopping",
                    epoch=epoch + 1, step=step + 1, value=None,
                ))
        elif grad_norm is not None:
            self._current.grad_norms.append(grad_norm)
        self._current.data_seconds.append(data_seconds)
        self._current.step_seconds.append(step_seconds)
        return None

    def end_epoch(self, history: Sequence[dict[str, Any]]) -> list[Finding]:
        """Close the epoch whose record is ``history[-1]`` (``epoch``, ``train_loss``, optional ``valid_loss``);
        returns the new findings and prints the epoch's health metric line."""
        record = history[-1]
        epoch, current, t = int(record["epoch"]), self._current, self.thresholds
        self._current = _EpochSteps()
        summary: dict[str, Any] = {"epoch": epoch, "train_loss": record.get("train_loss"),
                                   "valid_loss": record.get("valid_loss"), "steps": len(current.step_seconds),
                                   "skipped_steps": current.skipped}
        new: list[Finding] = []
        if current.grad_norms:
            median = statistics.median(current.grad_norms)
            summary |= {"grad_norm_median": median, "grad_norm_min": min(current.grad_norms),
                        "grad_norm_max": max(current.grad_norms)}
            state = gradient_state(median, t)
            if state is not None:
                bound = t.vanishing_gradient if state == "vanishing" else t.exploding_gradient
                new.append(Finding(f"{state}_gradient", "warning",
                                   f"median global gradient norm {median:.3g} in epoch {epoch} is "
                                   f"{'below' if state == 'vanishing' else 'above'} {bound:g}",
                                   epoch=epoch, value=median))
        if current.step_seconds:
            share = data_wait_share(current.data_seconds, current.step_seconds)
            summary["data_wait_share"] = share
            if share > t.data_wait_share:
                new.append(Finding("data_starvation", "warning",
                                   f"{share:.0%} of step time in epoch {epoch} went to preparing batches "
                                   f"(above {t.data_wait_share:.0%}): the device waits for data",
                                   epoch=epoch, value=share))
        train = [float(r["train_loss"]) for r in history if "train_loss" in r]
        if loss_not_decreasing(train, t.patience, t.min_improvement):
            new.append(Finding("loss_not_decreasing", "warning",
                               f"training loss has not improved by {t.min_improvement:.0%} for {t.patience} "
                               f"epochs (best {min(train):.4f}, last {train[-1]:.4f})", epoch=epoch, value=train[-1]))
        valid = [float(r["valid_loss"]) for r in history if "valid_loss" in r]
        if len(valid) == len(train) and overfitting(train, valid, t.patience):
            new.append(Finding("overfitting", "warning",
                               f"validation loss rose for {t.patience} epochs while training loss fell "
                               f"(validation {valid[-t.patience - 1]:.4f} -> {valid[-1]:.4f})",
                               epoch=epoch, value=valid[-1]))
        self.epochs.append(summary)
        self.findings += new
        for finding in new:
            self.log(f"health: WARNING {finding.check}: {finding.message}", flush=True)
        self.log(self.metric_line(summary), flush=True)
        return new

    def metric_line(self, summary: dict[str, Any]) -> str:
        """``name=value;`` pairs for SageMaker metric definitions (no ``epoch=``: the epoch line owns it)."""
        values = {"grad_norm": summary.get("grad_norm_median"), "data_wait_share": summary.get("data_wait_share"),
                  "health_warnings": sum(f.severity == "warning" for f in self.findings),
                  "health_fatal": int(self.fatal is not None)}
        return "health: " + " ".join(f"{k}={v:.4g};" if isinstance(v, float) else f"{k}={v};"
                                     for k, v in values.items() if v is not None)

    def _fatal(self, finding: Finding) -> Finding:
        self.fatal = finding
        self.findings.append(finding)
        self.log(f"health: FATAL {finding.check}: {finding.message}", flush=True)
        self.log("health: health_fatal=1;", flush=True)
        return finding

    def summary(self) -> dict[str, Any]:
        status = "fatal" if self.fatal else "warning" if self.findings else "ok"
        return {"status": status, "findings": [asdict(f) for f in self.findings], "epochs": self.epochs,
                "thresholds": asdict(self.thresholds)}

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / HEALTH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(), indent=2, default=str) + "\n")
        return path
