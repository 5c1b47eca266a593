from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml.evaluate import confusion, coverage
from tests.ml.conftest import ROOT, train_env


def test_evaluate_cli_prints_the_report_and_writes_plots(tiny_model_dir: Path, sample_dir: Path,
                                                          tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ml.evaluate", "--model-dir", str(tiny_model_dir), "--data", str(sample_dir),
         "--out", str(tmp_path)],
        cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 240 and report["headline_range"] == [1, 5]
    assert report["tta"] == 1  # what the model serves with: its config says no symmetries
    for section in ("headline", "headline_restricted", "full_range"):
        assert set(report[section]) >= {"accuracy", "rmse", "mae", "within1", "n"}
    assert report["full_range"]["n"] == 240
    matrix = report["confusion_matrix"]
    assert len(matrix) == 7 and sum(map(sum, matrix)) == 240
    assert set(report["per_class"]) == {str(c) for c in range(7)}
    assert report["coverage"][0]["coverage"] == 1.0
    assert report["coverage"][0]["accuracy"] == report["headline"]["accuracy"]
    for name in ("confusion.png", "curves.png", "coverage.png", "consignment.png", "decisions.png",
                 "evaluation.json"):
        assert (tmp_path / name).stat().st_size > 0
    # The consignment tables at the model's own operating point (the tiny run measured one), at 1, 5 and 20 %
    # wrong consignments, for both wrong-count mixes.
    applied = report["operating_point"]
    assert applied["source"] == "model config"
    config = json.loads((tiny_model_dir / "model-config.json").read_text())
    assert applied["thresholds"]["match_max_discrepancy"] == config["operating_point"]["match_max_discrepancy"]
    assert report["calibration"]["temperature"] == config["temperature"]
    for mix in ("prior", "near"):
        tables = applied["consignment"][mix]
        assert set(tables) == {"0.01", "0.05", "0.2"}
        for table in tables.values():
            assert set(table["by_offset"]) == {"0", "1", "2+"}
            assert [row["reviewed"] for row in table["review_top"]] == [0.05, 0.1, 0.2, 0.3]
            assert set(table["by_expected"]) == {str(c) for c in range(7)}
            assert {"precision", "recall", "share"} <= set(table["mismatch"])


def test_a_channel_of_shards_is_scored_exactly_as_the_folder_it_was_packed_from(tiny_model_dir: Path,
                                                                              sample_dir: Path,
                                                                              tmp_path: Path) -> None:
    # The pipeline's test channel is the pack stage's shards; scoring it must not depend on the layout.
    from ml import shards
    from ml.evaluate import evaluate

    shards.pack_folder(sample_dir, tmp_path / "test", "test", photos_per_shard=100)
    from_shards = evaluate(tiny_model_dir, tmp_path / "test")
    from_folder = evaluate(tiny_model_dir, sample_dir)
    assert from_shards["images"] == from_folder["images"] == 240
    for key in ("headline", "full_range", "confusion_matrix", "per_class"):
        assert from_shards[key] == from_folder[key]


def test_confusion_matrix_rows_are_truth_and_columns_predictions() -> None:
    matrix = confusion(torch.tensor([1, 2, 2]), torch.tensor([1, 1, 2]), [0, 1, 2])
    assert matrix == [[0, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_coverage_keeps_the_most_confident_answers() -> None:
    confidence = torch.tensor([0.9, 0.2, 0.8, 0.1])
    correct = torch.tensor([True, False, True, False])
    rows = {row["coverage"]: row for row in coverage(confidence, correct, levels=(1.0, 0.5))}
    assert rows[1.0]["accuracy"] == 0.5 and rows[0.5]["accuracy"] == 1.0
    assert rows[0.5]["min_confidence"] == pytest.approx(0.8)


def test_a_model_recalibrated_for_another_tta_serves_it_with_thresholds_fitted_on_its_own_probabilities(
        tiny_model_dir: Path, sample_dir: Path, tmp_path: Path) -> None:
    import shutil

    from ml import recalibrate
    from ml.evaluate import evaluate

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    scored = evaluate(model_dir, sample_dir, tta=2, save_logits=tmp_path / "logits-tta2.pt")
    saved = torch.load(tmp_path / "logits-tta2.pt")
    assert saved["tta"] == 2 and len(saved["logits"]) == len(saved["quantities"]) == len(saved["image_ids"]) == 240
    rescored = evaluate(model_dir, sample_dir, tta=2, logits_file=tmp_path / "logits-tta2.pt")
    assert rescored["headline"] == scored["headline"] and rescored["operating_point"] == scored["operating_point"]
    assert rescored["rejected"] == scored["rejected"] and rescored["images"] == scored["images"]
    with pytest.raises(ValueError, match="averaged over 2 symmetries"):
        evaluate(model_dir, sample_dir, tta=1, logits_file=tmp_path / "logits-tta2.pt")

    # Logits averaged over 2 symmetries cannot calibrate a model that serves one pass.
    with pytest.raises(SystemExit):
        recalibrate.main(["--model-dir", str(model_dir), "--validation", str(sample_dir),
                          "--logits", str(tmp_path / "logits-tta2.pt")])
    before = json.loads((model_dir / "model-config.json").read_text())
    # Refused before anything is written: the model keeps its tta and the thresholds fitted for it.
    with pytest.raises(SystemExit):
        recalibrate.main(["--model-dir", str(model_dir), "--validation", str(sample_dir),
                          "--logits", str(tmp_path / "logits-tta2.pt"), "--tta", "4"])
    assert json.loads((model_dir / "model-config.json").read_text()) == before
    recalibrate.main(["--model-dir", str(model_dir), "--validation", str(sample_dir),
                      "--logits", str(tmp_path / "logits-tta2.pt"), "--tta", "2"])
    after = json.loads((model_dir / "model-config.json").read_text())
    assert (before["tta"], after["tta"]) == (1, 2)
    assert after["metrics"]["calibration"]["photos"] == 240
    assert evaluate(model_dir, sample_dir)["tta"] == 2  # what the model now serves with
