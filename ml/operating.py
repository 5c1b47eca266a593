"""Operating points: the decision thresholds a model is served with, measured on its validation split at a
stated share of wrong consignments.

- **counting** (no expected count): the lowest calibrated confidence at which the answered count is right at
  least ``count_precision`` of the time, with its coverage, and the whole accuracy-coverage curve;
- **consignment checks** (an expected count is known): the decision uses ``q``, the posterior probability
  that the consignment is wrong given the photo and the error rate (``ml/decisions.py`` states the likelihood
  model). ``match`` when ``q <= match_max_discrepancy``, ``mismatch`` when ``q >= mismatch_min_discrepancy``,
  otherwise abstain (``uncounted-low-confidence``). Each threshold is the widest at which its decision is right
  at least its stated share of the time *at the stated rate* ``r``.

Consignments at a rate are weighted, not sampled: every validation photo (true class ``t``) is paired with every
class ``e`` as the announced count, the right pair weighted ``1 - r`` and each wrong one ``r w(e|t)``, with ``w``
the wrong-count distribution: ``prior`` (the likelihood model's own, ``w(e|t) = s(e) / (1 - s(e))`` with ``s``
the photos' class shares, which makes the true count of a wrong consignment distributed as bins are) or
``near`` (half the wrong ones off by one, half off by two or more, the mix the earlier thresholds were tuned on),
so the figures carry no sampling noise.

Where no threshold reaches its target, the key is ``null`` and ``not_decided`` says why: that decision is
never taken (never a placeholder threshold that looks like one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ml import decisions

MATCH = "match"
MISMATCH = "mismatch"
ABSTAIN = "uncounted-low-confidence"
THRESHOLD_KEYS = decisions.THRESHOLD_KEYS
WRONG_MIXES = ("prior", "near")
OFFSETS = ("0", "1", "2+")
REVIEW_SHARES = (0.05, 0.10, 0.20, 0.30)
REPORT_RATES = (0.01, 0.05, 0.20)


@dataclass(frozen=True)
class Targets:
    """The shares of decisions that must be right at ``error_rate``; the trainer's ``--*-precision`` knobs.

    At a 5 % error rate 95 % of consignments are right, so a ``match`` that is right 95 % of the time says
    nothing: it must beat the base rate by a margin (at most 1 wrong in 50, with 95 % confidence: 0.99 was out of
    the shipped model's reach). An alert (``mismatch``) right half the time sends a person to one fine bin per
    discrepancy found."""

    count_precision: float = 0.8
    match_precision: float = 0.98
    mismatch_precision: float = 0.5
    error_rate: float = decisions.DEFAULT_ERROR_RATE
    # A threshold chosen on fewer decisions (photos whose decision is right) than this is noise: not taken.
    min_support: int = 20
    # The stated precision must hold beyond validation: a threshold is taken where the one-sided 95 % Wilson
    # lower bound of its validation precision (effective sample size of the weighted pairs) reaches the target.
    # At z = 0 (the widest threshold at exactly the target) the shipped model's alerts were right 50 % of the
    # time on validation and 36.5 % (95 % interval 30-46 %) on test.
    z: float = 1.645


def class_prior(truth: torch.Tensor, num_classes: int) -> list[float]:
    """Share of each class among the training photos (the likelihood model's ``pi``)."""
    counts = torch.bincount(truth, minlength=num_classes).double()
    return [round(float(v), 6) for v in counts / counts.sum().clamp_min(1)]


def posterior(p_expected: torch.Tensor, prior_expected: torch.Tensor, rate: float) -> torch.Tensor:
    """``q`` elementwise: ``decisions.discrepancy_probability`` on tensors."""
    pi = prior_expected.double().clamp(decisions.MIN_PRIOR, 1 - decisions.MIN_PRIOR)
    p = p_expected.double().clamp(0, 1)
    wrong = rate * (1 - p) / (1 - pi)
    right = (1 - rate) * p / pi
    return (wrong / (wrong + right).clamp_min(1e-300)).float()


@dataclass
class Consignments:
    """Every (photo, announced class) pair with its weight at a rate; ``wrong`` where announced != true."""

    photo: torch.Tensor
    expected: torch.Tensor
    truth: torch.Tensor
    weight: torch.Tensor
    q: torch.Tensor

    @property
    def wrong(self) -> torch.Tensor:
        return self.expected != self.truth


def consignments(probabilities: torch.Tensor, truth: torch.Tensor, prior: list[float], rate: float,
                 mix: str = "prior") -> Consignments:
    """The pairs, weighted by the photos' own class shares (``prior`` is the posterior's ``pi``, which a model
    may state otherwise)."""
    n, k = probabilities.shape
    photo = torch.arange(n).repeat_interleave(k)
    expected = torch.arange(k).repeat(n)
    true = truth[photo]
    pi = torch.tensor(prior, dtype=torch.float64).clamp(decisions.MIN_PRIOR, 1 - decisions.MIN_PRIOR)
    shares = torch.tensor(class_prior(truth, k), dtype=torch.float64).clamp(decisions.MIN_PRIOR,
                                                                            1 - decisions.MIN_PRIOR)
    distance = (expected - true).abs()
    if mix == "prior":
        share = (shares / (1 - shares))[expected]
    elif mix == "near":
        near = (distance == 1).double()
        far = (distance >= 2).double()
        per_near = near.view(n, k).sum(1).clamp_min(1).repeat_interleave(k)
        per_far = far.view(n, k).sum(1).clamp_min(1).repeat_interleave(k)
        has_far = (far.view(n, k).sum(1) > 0).double().repeat_interleave(k)
        # Half off by one and half far off; a photo with no far class (none here: 7 classes) gives all to near.
        share = near / per_near * (1 - 0.5 * has_far) + far / per_far * 0.5
    else:
        raise ValueError(f"wrong-count mix must be one of {WRONG_MIXES}, got {mix!r}")
    weight = torch.where(distance == 0, torch.full_like(share, 1 - rate), rate * share)
    q = posterior(probabilities[photo, expected], pi.float()[expected], rate)
    return Consignments(photo, expected, true, weight.double(), q)


def _wilson_lower(p: float, n: float, z: float) -> float:
    if z == 0 or n <= 0:
        return p
    centre = p + z * z / (2 * n)
    spread = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5)
    return (centre - spread) / (1 + z * z / n)


def _widest_threshold(scores: torch.Tensor, right: torch.Tensor, precision: float, min_support: int,
                      descending: bool, weight: torch.Tensor | None = None, z: float = 0.0) -> dict:
    """The threshold that accepts the most weight (score >= t, or <= t when ascending) while the accepted are
    right at least ``precision`` of the (weighted) time; ties are accepted or refused together. None when no
    threshold does, with at least ``min_support`` right decisions behind it."""
    n = len(scores)
    weight = torch.ones(n, dtype=torch.float64) if weight is None else weight.double()
    order = scores.argsort(descending=descending, stable=True)
    ranked = scores[order].tolist()
    taken = weight[order].cumsum(0)
    hits = (weight * right.double())[order].cumsum(0)
    support = right[order].long().cumsum(0).tolist()
    total = float(weight.sum()) or 1.0
    squares = weight[order].pow(2).cumsum(0).tolist()
    taken_l, hits_l = taken.tolist(), hits.tolist()
    best = None
    for i in range(n):
        # Only where the next score differs: a threshold cannot split equal scores.
        if i + 1 < n and ranked[i + 1] == ranked[i]:
            continue
        if support[i] < min_support or taken_l[i] <= 0:
            continue
        effective = taken_l[i] ** 2 / squares[i]  # Kish's effective sample size of the weighted pairs
        if _wilson_lower(hits_l[i] / taken_l[i], effective, z) >= precision - 1e-12:
            best = i
    if best is None:
        return {"threshold": None, "reached": False, "accepted": 0, "coverage": 0.0, "precision": None}
    return {"threshold": ranked[best], "reached": True, "accepted": best + 1, "coverage": taken_l[best] / total,
            "precision": hits_l[best] / taken_l[best]}


def accuracy_coverage_curve(confidence: torch.Tensor, correct: torch.Tensor, points: int = 20) -> list[dict]:
    """Accuracy of the answers given when only the most confident share is answered, at even coverage steps."""
    order = confidence.argsort(descending=True, stable=True)
    hits = correct[order].float().cumsum(0)
    rows = []
    for step in range(1, points + 1):
        k = max(1, round(len(order) * step / points))
        rows.append({"coverage": round(step / points, 4), "min_confidence": round(float(confidence[order][k - 1]), 6),
                     "accuracy": round(float(hits[k - 1] / k), 6)})
    return rows


def decide(q: torch.Tensor, point: dict) -> torch.Tensor:
    """0 abstain, 1 match, 2 mismatch: the rule the count Lambda applies (``decisions.decide``)."""
    out = torch.zeros(len(q), dtype=torch.long)
    if point.get(decisions.MISMATCH_KEY) is not None:
        out[q >= point[decisions.MISMATCH_KEY]] = 2
    if point.get(decisions.MATCH_KEY) is not None:
        out[q <= point[decisions.MATCH_KEY]] = 1
    return out


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float | None:
    return round(float(num / den), 4) if float(den) > 0 else None


def consignment_table(c: Consignments, point: dict, bootstrap: int = 0, seed: int = 0) -> dict:
    """Precision and recall of match and mismatch (alerts) at the rate the weights stand for, the abstained
    share, the share of wrong consignments caught by reviewing the top 5-30 % by ``q``, and the decisions by
    announced count and by how far it is off. With ``bootstrap`` > 0, 95 % intervals over resampled photos."""
    made = decide(c.q, point)
    w, wrong = c.weight, c.wrong
    total = w.sum()
    table: dict = {}
    for code, name, truth_is in ((1, MATCH, False), (2, MISMATCH, True)):
        taken = made == code
        hit = taken & (wrong == truth_is)
        table[name] = {"precision": _ratio(w[hit].sum(), w[taken].sum()),
                       "recall": _ratio(w[hit].sum(), w[wrong == truth_is].sum()),
                       "share": _ratio(w[taken].sum(), total)}
        if bootstrap:
            table[name] |= _intervals(c, taken, hit, wrong == truth_is, bootstrap, seed)
    table[ABSTAIN] = {"share": _ratio(w[made == 0].sum(), total)}
    table["alerts_per_100_photos"] = round(100 * float(w[made == 2].sum() / total), 2)
    table["review_top"] = review_curve(c)
    distance = (c.expected - c.truth).abs()
    table["by_offset"] = {}
    for name, chosen in (("0", distance == 0), ("1", distance == 1), ("2+", distance >= 2)):
        table["by_offset"][name] = {"weight": round(float(w[chosen].sum() / total), 4)} | {
            d: _ratio(w[chosen & (made == code)].sum(), w[chosen].sum())
            for code, d in ((1, MATCH), (2, MISMATCH), (0, ABSTAIN))}
    table["by_expected"] = {}
    for e in range(int(c.expected.max()) + 1 if len(c.expected) else 0):
        row = {}
        for label, chosen in (("right", (c.expected == e) & ~wrong), ("wrong", (c.expected == e) & wrong)):
            row[label] = {d: _ratio(w[chosen & (made == code)].sum(), w[chosen].sum())
                          for code, d in ((1, MATCH), (2, MISMATCH), (0, ABSTAIN))}
        table["by_expected"][str(e)] = row
    return table


def review_curve(c: Consignments, shares=REVIEW_SHARES) -> list[dict]:
    """Share of the wrong consignments among the top ``share`` of photos by ``q`` (a review queue's order)."""
    order = c.q.argsort(descending=True, stable=True)
    taken = c.weight[order].cumsum(0) / c.weight.sum()
    caught = (c.weight * c.wrong.double())[order].cumsum(0) / (c.weight * c.wrong.double()).sum().clamp_min(1e-300)
    rows = []
    for share in shares:
        i = int(torch.searchsorted(taken, torch.tensor([share], dtype=torch.float64)).clamp_max(len(taken) - 1))
        rows.append({"reviewed": share, "wrong_caught": round(float(caught[i]), 4),
                     "min_discrepancy_probability": round(float(c.q[order][i]), 6)})
    return rows


def _intervals(c: Consignments, taken: torch.Tensor, hit: torch.Tensor, relevant: torch.Tensor, rounds: int,
               seed: int) -> dict:
    """95 % percentile intervals of precision and recall over photos resampled with replacement."""
    n = int(c.photo.max()) + 1 if len(c.photo) else 0
    per = {name: torch.zeros(n, dtype=torch.float64).index_add_(0, c.photo, c.weight * mask.double())
           for name, mask in (("taken", taken), ("hit", hit), ("relevant", relevant))}
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (rounds, n), generator=generator)
    ones = torch.ones(rounds, n, dtype=torch.float64)
    counts = torch.zeros(rounds, n, dtype=torch.float64).scatter_add_(1, picks, ones)
    precision = (counts @ per["hit"]) / (counts @ per["taken"]).clamp_min(1e-300)
    recall = (counts @ per["hit"]) / (counts @ per["relevant"]).clamp_min(1e-300)
    valid = (counts @ per["taken"]) > 0

    def interval(values: torch.Tensor) -> list[float] | None:
        if not valid.any():
            return None
        kept = values[valid]
        return [round(float(kept.quantile(0.025)), 4), round(float(kept.quantile(0.975)), 4)]

    return {"precision_95ci": interval(precision), "recall_95ci": interval(recall)}


def apply(point: dict, probabilities: torch.Tensor, truth: torch.Tensor,
          answer: tuple[torch.Tensor, torch.Tensor], rates=REPORT_RATES, bootstrap: int = 200) -> dict:
    """How a model's own thresholds (``point``, from its config) decide on other photos: the counted share and
    its accuracy, and the consignment tables at each rate for both wrong-count mixes."""
    confidence, answered = answer
    threshold = point.get(decisions.COUNT_KEY)
    counted = confidence >= threshold if threshold is not None else torch.zeros(len(truth), dtype=torch.bool)
    prior = point.get("class_prior") or [1 / probabilities.shape[1]] * probabilities.shape[1]
    return {
        "thresholds": {key: point.get(key) for key in THRESHOLD_KEYS},
        "count": {"coverage": round(float(counted.float().mean()), 4) if len(truth) else None,
                  "precision": round(float((answered == truth)[counted].float().mean()), 4) if counted.any() else None},
        "consignment": {mix: {f"{rate:g}": consignment_table(consignments(probabilities, truth, prior, rate, mix),
                                                             point, bootstrap)
                              for rate in rates} for mix in WRONG_MIXES},
        "accuracy_coverage": accuracy_coverage_curve(confidence, answered == truth) if len(truth) else [],
    }


def operating_point(probabilities: torch.Tensor, truth: torch.Tensor, answer: tuple[torch.Tensor, torch.Tensor],
                    targets: Targets = Targets(), prior: list[float] | None = None) -> dict:
    """Everything ``model-config.json`` carries about how to decide with this model.

    ``probabilities`` (N, classes, calibrated) and ``truth`` (N,) are count classes of the validation photos;
    ``answer`` is (confidence, class) as the model serves; ``prior`` the training photos' class shares (the
    validation photos' when not given)."""
    confidence, answered = answer
    num_classes = probabilities.shape[1]
    prior = prior or class_prior(truth, num_classes)
    count = _widest_threshold(confidence, answered == truth, targets.count_precision, targets.min_support,
                              descending=True, z=targets.z)
    c = consignments(probabilities, truth, prior, targets.error_rate, "prior")
    match = _widest_threshold(c.q, ~c.wrong, targets.match_precision, targets.min_support, descending=False,
                              weight=c.weight, z=targets.z)
    mismatch = _widest_threshold(c.q, c.wrong, targets.mismatch_precision, targets.min_support, descending=True,
                                 weight=c.weight, z=targets.z)
    point: dict = {
        decisions.COUNT_KEY: None if count["threshold"] is None else round(count["threshold"], 6),
        decisions.MATCH_KEY: None if match["threshold"] is None else round(match["threshold"], 6),
        decisions.MISMATCH_KEY: None if mismatch["threshold"] is None else round(mismatch["threshold"], 6),
        "class_prior": prior,
        "consignment_error_rate": targets.error_rate,
    }
    if point[decisions.MATCH_KEY] is not None and point[decisions.MISMATCH_KEY] is not None \
            and point[decisions.MATCH_KEY] >= point[decisions.MISMATCH_KEY]:
        # Cannot happen with match_precision + mismatch_precision > 1 (a pair accepted by both would be right
        # and wrong); kept as a guard: match is the costlier error, so mismatch yields.
        point[decisions.MISMATCH_KEY] = None
    reasons = {}
    for key, _found, target, what in ((decisions.COUNT_KEY, count, targets.count_precision, "a count"),
                                     (decisions.MATCH_KEY, match, targets.match_precision, "a match"),
                                     (decisions.MISMATCH_KEY, mismatch, targets.mismatch_precision, "a mismatch")):
        if point[key] is None:
            reasons[key] = (f"no threshold makes {what} right {target:.0%} of the time (one-sided 95 % lower "
                            f"bound, z={targets.z:g}) with {targets.min_support} right decisions behind it on "
                            f"{len(truth)} validation photos at a {targets.error_rate:.0%} error rate: never decided")
    if reasons:
        point["not_decided"] = reasons
    applied = apply(point, probabilities, truth, answer, rates=(targets.error_rate,), bootstrap=0)
    return point | {
        "targets": asdict(targets),
        "measured_on": {"photos": len(truth)},
        "count": {"reached": count["reached"]} | applied["count"],
        "consignment": {"match_reached": match["reached"], "mismatch_reached": mismatch["reached"]}
        | applied["consignment"]["prior"][f"{targets.error_rate:g}"],
        "accuracy_coverage": applied["accuracy_coverage"],
    }


def summary_metrics(point: dict) -> dict[str, float]:
    """Flat ``op_*`` figures for the job's metrics: the thresholds of the decisions taken (a decision never taken
    has none), how many decisions are taken, and what each decides on validation; the deploy gate reads them."""
    table = point["consignment"]
    figures = {f"op_{key}": point[key] for key in THRESHOLD_KEYS if point.get(key) is not None}
    figures |= {"op_decisions_taken": len(decisions.decided(point)),
                "op_count_coverage": point["count"]["coverage"] or 0.0,
                "op_match_share": table[MATCH]["share"] or 0.0, "op_mismatch_share": table[MISMATCH]["share"] or 0.0,
                "op_abstain_share": table[ABSTAIN]["share"] or 0.0,
                "op_consignment_error_rate": point["consignment_error_rate"]}
    return {k: float(v) for k, v in figures.items()}
