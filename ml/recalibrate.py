"""Recalibrate a trained model without retraining it:
``python -m ml.recalibrate --model-dir DIR --validation DIR [--train-prior split.json]``.

Does what the trainer does at the end of a job (``ml.train.measure_operating_point``): fits the temperature on the
validation photos and measures the operating point on the calibrated probabilities at the stated error rate and
precisions, then writes both into the model's ``model-config.json`` (and its ``code/`` copy of the serving
modules). Prints the calibration report and the operating point as JSON.

``--tta N`` changes how many symmetries the model averages when it serves, and so recalibrates for that: the
temperature and the thresholds are fitted on the probabilities the model will serve, never carried over from
another ``tta``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ml import channel as mlchannel
from ml import data as mldata
from ml import decisions, operating
from ml.model import load_model
from ml.train import calibrate_and_measure, measure_operating_point, write_serving_code


def prior_from_split(split_file: Path, num_classes: int) -> list[float]:
    """The training photos' class shares from ``ml.data split``'s split.json (classes 0.. and "N+")."""
    counts = json.loads(split_file.read_text())["counts"]["train"]
    ordered = [counts.get(str(k), 0) for k in range(num_classes - 1)] + [counts.get(f"{num_classes - 1}+", 0)]
    total = sum(ordered)
    return [round(c / total, 6) for c in ordered]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.recalibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--validation", required=True, help="the validation channel the model was chosen on")
    parser.add_argument("--train-prior", type=Path, default=None,
                        help="split.json whose train counts give the class prior (default: the validation photos')")
    defaults = operating.Targets()
    parser.add_argument("--count-precision", type=float, default=defaults.count_precision)
    parser.add_argument("--match-precision", type=float, default=defaults.match_precision)
    parser.add_argument("--mismatch-precision", type=float, default=defaults.mismatch_precision)
    parser.add_argument("--consignment-error-rate", type=float, default=decisions.DEFAULT_ERROR_RATE)
    parser.add_argument("--uniform-prior", action="store_true",
                        help="read p(k|x) as a likelihood up to a constant (pi uniform) instead of dividing by the "
                             "training class shares")
    parser.add_argument("--logits", type=Path, default=None,
                        help="the validation photos' saved logits ({'logits', 'quantities'}, torch.save), instead "
                             "of scoring --validation again")
    parser.add_argument("--tta", type=int, default=None, choices=range(1, 9),
                        help="symmetries the model averages when it serves from now on (default: keep its own)")
    args = parser.parse_args(argv)
    _, config = load_model(args.model_dir)
    # In memory only: calibrate_and_measure writes the config once, with the new tta, its temperature and its
    # thresholds together, so a refused or failed run leaves the model as it was.
    config.tta = config.tta if args.tta is None else args.tta
    prior = prior_from_split(args.train_prior, config.num_classes) if args.train_prior else None
    if args.uniform_prior:
        prior = [round(1 / config.num_classes, 6)] * config.num_classes
    targets = operating.Targets(count_precision=args.count_precision, match_precision=args.match_precision,
                                mismatch_precision=args.mismatch_precision,
                                error_rate=decisions.check_rate(args.consignment_error_rate))
    if args.logits is not None:
        saved = torch.load(args.logits)
        if saved.get("tta", 1) != config.tta:
            parser.error(f"{args.logits} holds logits averaged over {saved.get('tta', 1)} symmetries, but the model "
                         f"serves with tta {config.tta}; score with ml.evaluate --tta {config.tta} --save-logits")
        point, fitted = calibrate_and_measure(args.model_dir, config, saved["logits"], saved["quantities"], targets,
                                              prior)
    else:
        valid = mlchannel.load_channel(mldata.resolve_data(args.validation), config.image_size)
        point, fitted = measure_operating_point(args.model_dir, valid, torch.device("cpu"), targets, prior,
                                                tta=config.tta)
    write_serving_code(args.model_dir)
    json.dump({"calibration": fitted, "operating_point": point}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
