"""Smoke tests of the benchmark harness: each benchmark function runs once in a tiny mode and returns figures of
the right shape. No timing is asserted anywhere; the figures themselves come from ``python -m bench``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import coldstart, common, serving, table, training, variants

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bench_model_dir(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """A real, barely trained model of the served architecture at a small input size (seconds to train)."""
    base = tmp_path_factory.mktemp("bench-model")
    command = [sys.executable, "-m", "ml.train", "--train", str(sample_dir), "--model-dir", str(base / "model"),
               "--output-data-dir", str(base / "output"), "--checkpoint-dir", str(base / "checkpoints"),
               "--epochs", "1", "--limit", "16", "--batch-size", "8", "--image-size", "64", "--freeze-blocks", "8",
               "--threads", "1", "--log-interval", "1000"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return base / "model"


def test_percentile_interpolates_between_ranks():
    assert common.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert common.percentile([5.0], 95) == 5.0
    assert math.isnan(common.percentile([], 50))


def test_static_padding_keeps_the_network_output(bench_model_dir: Path):
    import torch

    eager, _ = variants.load(bench_model_dir, "eager")
    static, _ = variants.load(bench_model_dir, "static+cl+jit")
    x = torch.randn(2, 3, eager.config.image_size, eager.config.image_size)
    with torch.no_grad():
        assert torch.allclose(eager.network(x), static.network(x), atol=1e-3)


def test_unknown_variant_step_is_refused(bench_model_dir: Path):
    with pytest.raises(ValueError, match="unknown variant"):
        variants.load(bench_model_dir, "static+turbo")


def test_a_tta_step_makes_the_variant_average_that_many_symmetries_whatever_the_config_says(bench_model_dir: Path):
    plain, _ = variants.load(bench_model_dir, "static+cl+jit")
    averaged, _ = variants.load(bench_model_dir, "static+cl+jit+tta8")
    assert (plain.tta, averaged.tta) == (plain.config.tta, 8)
    with pytest.raises(ValueError, match="unknown variant"):
        variants.load(bench_model_dir, "static+tta9")


def test_serverless_cost_bills_the_request_time_at_the_configured_memory_plus_the_data():
    # 100 ms at 3 GB: 0.1 s x $0.00006/s = $0.000006 a photo; 10 kB in and 1 kB out at $0.016/GB each way.
    cost = serving.serverless_cost_per_1000(100.0, 10_000, 1_000, 3072)
    assert cost == pytest.approx(1000 * (0.1 * 0.00006 + 11_000 / 1e9 * 0.016))
    assert serving.serverless_cost_per_1000(800.0, 10_000, 1_000, 3072) > 7 * cost
    assert serving.serverless_memory_mb() == json.loads((ROOT / "cdk.json").read_text())["context"][
        "endpointServerlessMemoryMb"]


def test_serving_measures_ours_and_the_seed_through_the_serving_functions(bench_model_dir: Path, sample_dir: Path):
    for system, variant in (("ours", "eager"), ("ours", "static+cl+jit"), ("seed", "eager")):
        result = serving.measure(system, str(bench_model_dir), str(sample_dir), variant=variant, iterations=2,
                                 warmup=1, batch_sizes=[2], batch_repeats=1)
        assert result["batch1"]["n"] == 2
        assert result["batch1"]["p50_ms"] > 0
        assert set(result["batch1_stages_p50_ms"]) == {"input_fn", "predict_fn", "output_fn"}
        assert result["best"]["batch_size"] == 2 and result["best"]["photos_per_s"] > 0
        assert result["serverless"]["usd_per_1000_photos"] > 0


def test_paired_times_the_seed_and_ours_in_turns(bench_model_dir: Path, sample_dir: Path):
    result = serving.paired(str(bench_model_dir), str(sample_dir), ["eager"], iterations=2, warmup=0)
    assert set(result["batch1"]) == {"seed ResNet-101", "ours eager"}
    assert all(stats["n"] == 2 for stats in result["batch1"].values())
    assert result["speedup_vs_seed"]["seed ResNet-101"] == 1.0


def test_accuracy_scores_each_variant_on_held_out_photos(bench_model_dir: Path, sample_dir: Path):
    result = serving.accuracy(str(bench_model_dir), str(sample_dir), ["eager", "static+cl+jit"], limit=12)
    assert result["images"] == 12
    eager = result["variants"]["eager"]
    assert eager["agreement_with_first"] == 1.0
    assert 0.0 <= eager["headline"]["accuracy"] <= 1.0
    assert result["variants"]["static+cl+jit"]["agreement_with_first"] >= 0.9


def test_training_measures_the_loop_and_the_loader_alone(sample_dir: Path):
    ours = training.ours(str(sample_dir), steps=1, warmup=0,
                         extra_args=["--batch-size", "2", "--image-size", "64", "--freeze-blocks", "8"])
    assert ours["steps"] == 1 and ours["loop_images_per_s"] > 0 and ours["loader_images_per_s"] > 0
    seed = training.seed(str(sample_dir), steps=1, warmup=0, batch_size=2)
    assert seed["loop_images_per_s"] > 0 and seed["loader_images_per_s"] > 0


def test_coldstart_finds_every_handler_named_in_infra_and_sizes_the_asset():
    names = coldstart.handlers()
    assert "lambdas.count.handler.handler" in names
    assert all(name.startswith("lambdas.") for name in names)
    package = coldstart.package_size()
    assert package["files"] > 0 and 0 < package["zip_bytes"] <= package["bytes"]
    assert "ml" in package["bytes_by_folder"]
    timing = coldstart.import_time("lambdas.count.records", repeats=1)
    assert timing.get("error") is None and timing["import_ms_p50"] > 0


def test_count_lambda_counts_every_upload_against_local_stand_ins(bench_model_dir: Path, sample_dir: Path):
    result = coldstart.count_per_record(str(bench_model_dir), str(sample_dir), photos=3, batch_size=2)
    assert result["records_stored"] == 3
    assert result["batch_item_failures"] == 0
    assert result["warm_ms_per_record_p50"] > 0


def test_report_renders_the_tables_from_results(tmp_path: Path):
    run = {"system": "seed", "variant": "eager", "device": "cpu", "label": "seed", "threads": 2, "peak_rss_mib": 900.0,
           "batch1": {"p50_ms": 80.0, "p95_ms": 90.0}, "batch1_stages_p50_ms": {"input_fn": 1.0, "predict_fn": 78.0},
           "throughput": [{"batch_size": 1, "photos_per_s": 12.5}], "best": {"batch_size": 1, "photos_per_s": 12.5}}
    ours = run | {"system": "ours", "label": "ours eager", "batch1": {"p50_ms": 8.0, "p95_ms": 9.0}}
    results = {"serving": {"runs": [run, ours], "accuracy": {"variants": {"eager": {
        "headline": {"accuracy": 0.6}, "agreement_with_first": 1.0}}}, "seed_note": "untrained"}}
    text = table.render(results, {"date": "now", "cpus": 2}, {"threads": 2, "seconds": 1.0})
    assert "| ours eager | 8.0 |" in text
    assert "10.0x" in text
    head = table.headline(results)["serving"]
    assert head["speedup_best"] == 10.0 and head["best_keeps_accuracy"] is True
    json.dumps(head)
