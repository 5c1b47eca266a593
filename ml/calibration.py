"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one number ``T`` that
divides the logits, fitted on the validation photos at the end of training by minimising their negative
log-likelihood. It changes no answer (the argmax is the same) but makes the probabilities mean what they say,
which the consignment posterior (``ml/decisions.py``) relies on. ECE (expected calibration error: the gap
between confidence and accuracy, averaged over equal-width confidence bins weighted by their share of photos)
is reported before and after.
"""

from __future__ import annotations

import itertools

import torch

ECE_BINS = 15
# T outside this range means the logits are broken rather than over- or under-confident.
T_RANGE = (0.05, 20.0)


def calibrated(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities of logits (or log-probabilities, as a symmetry average gives) at a temperature."""
    return (logits.float() / temperature).softmax(-1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (class indices)."""
    if len(labels) == 0:
        return 1.0
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)  # T = exp(log_t) stays positive
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    low, high = T_RANGE
    return float(min(max(log_t.exp().item(), low), high))


def ece(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence, in [0, 1]."""
    if len(labels) == 0:
        return 0.0
    confidence, predicted = probabilities.max(-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += float(inside.float().mean()) * abs(float(confidence[inside].mean() - correct[inside].mean()))
    return total


def report(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The fitted temperature with ECE and negative log-likelihood before and after."""
    temperature = fit_temperature(logits, labels)
    before, after = calibrated(logits, 1.0), calibrated(logits, temperature)
    nll = torch.nn.functional.nll_loss
    return {
        "temperature": round(temperature, 6),
        "ece_before": round(ece(before, labels), 6),
        "ece_after": round(ece(after, labels), 6),
        "nll_before": round(float(nll(before.clamp_min(1e-12).log(), labels)), 6),
        "nll_after": round(float(nll(after.clamp_min(1e-12).log(), labels)), 6),
        "photos": len(labels),
    }
