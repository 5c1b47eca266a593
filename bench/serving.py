"""Serving: per-photo latency at batch 1 and throughput at the best batch size, through the serving functions
(``input_fn`` with the JPEG decode, ``predict_fn``, ``output_fn``), for our served model, its faster variants
and the seed's ResNet-101; plus each variant's accuracy on the held-out split, so no speed-up hides a loss.

Every model runs in its own child process (fresh interpreter, its own peak RSS), one after the other in the
same ``python -m bench`` run, so the seed/ours ratio compares like with like.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench import common

# The variants of our model measured by default, cheapest first. "eager" is the plain model; ml/inference.py's
# model_fn serves "static+cl+jit" on CPU (ml.model.for_cpu_serving), chosen from these figures.
# (static alone, int8 without channels-last and static+cl+compile were measured too and lost to these; pass them
# with --variants to see them again.)
# "+tta8" is the served variant averaging the 8 symmetries of the square (issue 27: measured so that the served
# default is chosen from its accuracy, latency and cost, not assumed).
VARIANTS = ("eager", "static+cl", "static+cl+jit", "int8+cl+jit", "static+cl+jit+tta8")
QUICK_VARIANTS = ("eager", "static+cl+jit", "static+cl+jit+tta8")
BATCH_SIZES = (1, 8, 32)
QUICK_BATCH_SIZES = (1, 4)

# SageMaker Serverless Inference bills the time each request runs, at the endpoint's configured memory, and the
# data processed in and out. US East (N. Virginia), on demand, as listed on aws.amazon.com/sagemaker/pricing
# ("Serverless Inference"): $0.0000200 a second per 1,024 MB configured (1 GB: $0.00002/s ... 6 GB: $0.00012/s),
# and $0.016 per GB of data processed in and again out. Other regions differ; this machine cannot reach the page,
# so check it before quoting a cost. The serverless vCPU share grows with the memory size and is not published:
# the cost below assumes the endpoint runs a photo as fast as this machine does at batch 1.
SERVERLESS_PRICE_PER_SECOND_PER_GB = 0.00002
SERVERLESS_DATA_PRICE_PER_GB = 0.016


def serverless_memory_mb() -> int:
    """The stack's default serverless memory size (cdk.json's ``endpointServerlessMemoryMb``)."""
    context = json.loads((common.ROOT / "cdk.json").read_text())["context"]
    return int(context["endpointServerlessMemoryMb"])


def serverless_price_per_second(memory_mb: int) -> float:
    return SERVERLESS_PRICE_PER_SECOND_PER_GB * memory_mb / 1024


def serverless_cost_per_1000(batch1_p50_ms: float, request_bytes: float, response_bytes: float,
                             memory_mb: int) -> float:
    """US dollars for 1,000 photos sent one per request (what the count Lambda does) to a serverless endpoint."""
    compute = batch1_p50_ms / 1000 * serverless_price_per_second(memory_mb)
    data = (request_bytes + response_bytes) / 1e9 * SERVERLESS_DATA_PRICE_PER_GB
    return 1000 * (compute + data)


def _functions(system: str, model_dir: str, variant: str, calibration_dir: str | None) -> tuple[Any, Any, dict]:
    """(serving module, loaded model, load timings) for ``system`` in ("ours", "seed")."""
    if system == "seed":
        from bench import seed

        started = time.perf_counter()
        model = seed.model_fn()
        return seed, model, {"model_fn_s": round(time.perf_counter() - started, 3)}
    from bench import variants
    from ml import inference

    model, timings = variants.load(model_dir, variant, calibration_dir)
    if variant != "eager":
        model.device = torch.device("cpu")  # the variants are CPU builds
    return inference, model, timings


def _json_batch(bodies: list[bytes]) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in bodies]}).encode()


def measure(system: str, model_dir: str, photos_dir: str, variant: str = "eager", iterations: int = 60,
            warmup: int = 5, batch_sizes: list[int] | None = None, batch_repeats: int = 3,
            calibration_dir: str | None = None) -> dict[str, Any]:
    """One model in this process: batch-1 latency (end to end and per stage) and batch throughput."""
    module, model, load_timings = _functions(system, model_dir, variant, calibration_dir)
    photos = [f.read_bytes() for f in common.photo_files(Path(photos_dir), 256)]
    if not photos:
        raise RuntimeError(f"no photos in {photos_dir}/bin-images")

    def photo(i: int) -> bytes:
        return photos[i % len(photos)]

    stages: dict[str, list[float]] = {"input_fn": [], "predict_fn": [], "output_fn": []}
    response_bytes: list[int] = []

    def one(i: int, record: bool = True) -> None:
        t0 = time.perf_counter()
        data = module.input_fn(photo(i), "image/jpeg")
        t1 = time.perf_counter()
        prediction = module.predict_fn(data, model)
        t2 = time.perf_counter()
        answer = module.output_fn(prediction, "application/json")
        t3 = time.perf_counter()
        if "count" not in json.loads(answer):
            raise RuntimeError(f"{system} {variant}: the answer has no count: {answer[:200]}")
        if record:
            response_bytes.append(len(answer))
            stages["input_fn"].append(t1 - t0)
            stages["predict_fn"].append(t2 - t1)
            stages["output_fn"].append(t3 - t2)

    for i in range(warmup):
        one(i, record=False)
    total = common.time_calls(lambda i: one(warmup + i), iterations, 0)

    throughput = []
    for size in batch_sizes or list(BATCH_SIZES):
        bodies = [_json_batch([photo(size * r + k) for k in range(size)]) for r in range(batch_repeats + 1)]

        def batch(r: int, bodies: list[bytes] = bodies, size: int = size) -> None:
            data = module.input_fn(bodies[r], "application/json")
            answer = module.output_fn(module.predict_fn(data, model), "application/json")
            if len(json.loads(answer)["predictions"]) != size:
                raise RuntimeError(f"a batch of {size} photos did not get {size} predictions")

        # bodies[0] is the warm-up of this batch shape; the others are timed.
        batch(0)
        times = common.time_calls(lambda r, batch=batch: batch(r + 1), batch_repeats, 0)
        median = common.percentile(times, 50)
        throughput.append({"batch_size": size, "batch_p50_ms": round(median * 1000, 2),
                           "photos_per_s": round(size / median, 2), "per_photo_ms": round(median * 1000 / size, 2)})
    best = max(throughput, key=lambda row: row["photos_per_s"]) if throughput else None
    batch1 = common.summarize_ms(total)
    request_mean = sum(len(photo(warmup + i)) for i in range(iterations)) / max(1, iterations)
    response_mean = sum(response_bytes) / max(1, len(response_bytes))
    memory_mb = serverless_memory_mb()
    return {
        "system": system,
        "variant": variant,
        "device": str(model.device),
        "tta": getattr(model, "tta", 1),
        "load": load_timings,
        "batch1": batch1,
        "serverless": {"memory_mb": memory_mb,
                       "usd_per_second": serverless_price_per_second(memory_mb),
                       "usd_per_gb_data": SERVERLESS_DATA_PRICE_PER_GB, "request_bytes_mean": round(request_mean),
                       "response_bytes_mean": round(response_mean),
                       "usd_per_1000_photos": serverless_cost_per_1000(batch1["p50_ms"], request_mean,
                                                                       response_mean, memory_mb)},
        "batch1_stages_p50_ms": {k: round(common.percentile(v, 50) * 1000, 3) for k, v in stages.items()},
        "throughput": throughput,
        "best": best,
    }


def paired(model_dir: str, photos_dir: str, variants: list[str], iterations: int = 30, warmup: int = 3,
           calibration_dir: str | None = None) -> dict[str, Any]:
    """Batch-1 latency of the seed and of our variants measured in turns, photo by photo, in one process: a
    slow spell of the machine hits every system alike, so the ratio to the seed holds even when the absolute
    figures do not. (Peak memory is not meaningful here; the per-model runs give it.)"""
    systems = [("seed", "eager", "seed ResNet-101")] + [("ours", v, f"ours {v}") for v in variants]
    loaded = []
    for system, variant, label in systems:
        module, model, _ = _functions(system, model_dir, variant, calibration_dir)
        loaded.append((label, module, model))
    photos = [f.read_bytes() for f in common.photo_files(Path(photos_dir), 256)]
    times: dict[str, list[float]] = {label: [] for label, _, _ in loaded}
    for i in range(warmup + iterations):
        body = photos[i % len(photos)]
        # Rotate the order each round so no system always runs right after the same neighbour.
        for k in range(len(loaded)):
            label, module, model = loaded[(i + k) % len(loaded)]
            started = time.perf_counter()
            module.output_fn(module.predict_fn(module.input_fn(body, "image/jpeg"), model), "application/json")
            if i >= warmup:
                times[label].append(time.perf_counter() - started)
    stats = {label: common.summarize_ms(values) for label, values in times.items()}
    seed_p50 = stats["seed ResNet-101"]["p50_ms"]
    return {"iterations": iterations, "batch1": stats,
            "speedup_vs_seed": {label: round(seed_p50 / s["p50_ms"], 2) for label, s in stats.items()}}


def accuracy(model_dir: str, test_dir: str, variants: list[str], calibration_dir: str | None = None,
             limit: int = 0, eval_range: tuple[int, int] = (1, 5)) -> dict[str, Any]:
    """Held-out accuracy of each variant, computed as ``ml.evaluate`` computes its headline (the served answer,
    photos with a count in ``eval_range``), and how often each variant agrees with the eager model."""
    from bench import variants as variant_module
    from ml import data as mldata
    from ml.train import count_metrics, predict_logits, targets_for

    base, _ = variant_module.load(model_dir, "eager")
    config = base.config
    records, _rejected = mldata.abid.scan_folder(Path(test_dir))
    if limit:
        records = records[:limit]
    cached = mldata.load_images(Path(test_dir), config.image_size, records)
    quantities = cached.quantities
    lo, hi = eval_range
    inside = (quantities >= lo) & (quantities <= hi)
    max_count = config.num_classes - 1 - int(config.overflow)
    truth_full = targets_for(quantities, max_count, config.overflow)
    results: dict[str, Any] = {"test_dir": str(test_dir), "images": len(cached.records), "headline_range": [lo, hi],
                               "variants": {}}
    reference = None
    for name in variants:
        model, _ = variant_module.load(model_dir, name, calibration_dir)
        started = time.perf_counter()
        # predict_logits converts the batch to channels-last itself; every variant takes NCHW or NHWC alike.
        logits = predict_logits(model.network, cached.images, config, torch.device("cpu"), batch_size=32,
                                tta=model.tta)
        seconds = time.perf_counter() - started
        pred = config.answer(logits)[1]
        reference = pred if reference is None else reference
        results["variants"][name] = {
            "headline": {k: round(v, 4) for k, v in count_metrics(pred[inside], quantities[inside]).items()},
            "full_range": {k: round(v, 4) for k, v in count_metrics(pred, truth_full).items()},
            "agreement_with_first": round(float((pred == reference).float().mean()), 4),
            "seconds": round(seconds, 2),
        }
    results["reference_variant"] = variants[0]
    return results


def served_evaluation(model_dir: Path) -> dict[str, Any] | None:
    """The ML engineer's evaluation report next to the model (held-out test split), if there is one."""
    # models/abid-effnet-lite0/train.sh writes the held-out report to runs/main/eval-test before the model is copied.
    candidates = sorted(Path(model_dir).rglob("*.json"))
    if Path(model_dir) == common.SERVED_MODEL_DIR:
        candidates.append(common.ROOT / "runs" / "main" / "eval-test" / "evaluation.json")
    for candidate in (c for c in candidates if c.is_file() and "valid" not in c.parent.name):
        try:
            document = json.loads(candidate.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(document, dict) and isinstance(document.get("headline"), dict):
            return {"file": str(candidate.relative_to(common.ROOT)) if candidate.is_relative_to(common.ROOT)
                    else str(candidate), "data": document.get("data"), "images": document.get("images"),
                    "tta": document.get("tta"), "headline": document["headline"],
                    "full_range": document.get("full_range")}
    return None


def run(ctx: common.Context) -> dict[str, Any]:
    iterations = ctx.scale(40, 4)
    warmup = ctx.scale(8, 1)
    batch_sizes = list(QUICK_BATCH_SIZES if ctx.quick else BATCH_SIZES)
    repeats = ctx.scale(3, 1)
    chosen = list(ctx.variants or (QUICK_VARIANTS if ctx.quick else VARIANTS))
    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    kwargs = {"model_dir": str(ctx.model_dir), "photos_dir": str(ctx.test_dir), "iterations": iterations,
              "warmup": warmup, "batch_sizes": batch_sizes, "batch_repeats": repeats,
              "calibration_dir": str(ctx.train_dir)}
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []

    def attempt(system: str, variant: str, env: dict[str, str], label: str, **extra: Any) -> None:
        try:
            result = common.run_child("bench.serving:measure", kwargs | {"system": system, "variant": variant} | extra,
                                      threads=ctx.threads, env=env, timeout=900)
        except common.ChildFailed as error:
            failures.append({"label": label, "error": str(error)[-1500:]})
            print(f"  serving {label}: FAILED ({str(error).splitlines()[0]})", flush=True)
            return
        result["label"] = label
        runs.append(result)
        print(f"  serving {label}: batch 1 p50 {result['batch1']['p50_ms']:.1f} ms, best "
              f"{result['best']['photos_per_s']:.1f} photos/s at batch {result['best']['batch_size']}, "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)

    # The seed first and last: if the machine's speed drifts during the run, the two seed figures show it.
    attempt("seed", "eager", cpu_only, "seed ResNet-101 (CPU)")
    for variant in chosen:
        attempt("ours", variant, cpu_only, f"ours {variant} (CPU)")
    if not ctx.quick:
        attempt("seed", "eager", cpu_only, "seed ResNet-101 (CPU, again)")
    if torch.cuda.is_available():
        attempt("seed", "eager", {}, "seed ResNet-101 (GPU)")
        attempt("ours", "eager", {}, "ours eager (GPU)")

    paired_result: dict[str, Any] | None = None
    try:
        paired_result = common.run_child("bench.serving:paired", {
            "model_dir": str(ctx.model_dir), "photos_dir": str(ctx.test_dir), "variants": chosen,
            "iterations": ctx.scale(40, 2), "warmup": ctx.scale(4, 1), "calibration_dir": str(ctx.train_dir)},
            threads=ctx.threads, env=cpu_only, timeout=900)
        print("  serving paired (batch 1, in turns): " + ", ".join(
            f"{k} {v['p50_ms']:.1f} ms" for k, v in paired_result["batch1"].items()), flush=True)
    except common.ChildFailed as error:
        failures.append({"label": "paired", "error": str(error)[-1500:]})

    decode_result: dict[str, Any] | None = None
    try:
        decode_result = common.run_child("bench.serving:decode", {"photos_dir": str(ctx.test_dir),
                                                                  "iterations": ctx.scale(60, 4)},
                                         threads=ctx.threads, env=cpu_only, timeout=600)
    except common.ChildFailed as error:
        failures.append({"label": "decode", "error": str(error)[-1500:]})

    accuracy_result: dict[str, Any] | None = None
    try:
        accuracy_result = common.run_child(
            "bench.serving:accuracy",
            {"model_dir": str(ctx.model_dir), "test_dir": str(ctx.test_dir),
             # eager first: agreement is measured against the shipped model.
             "variants": ["eager", *[v for v in chosen if v != "eager"]],
             "calibration_dir": str(ctx.train_dir), "limit": ctx.scale(0, 24)},
            threads=ctx.threads, env=cpu_only, timeout=900)
    except common.ChildFailed as error:
        failures.append({"label": "accuracy", "error": str(error)[-1500:]})
    return {
        "model_dir": str(ctx.model_dir),
        "model_provenance": ctx.model_provenance,
        "photos_dir": str(ctx.test_dir),
        "calibration_dir": str(ctx.train_dir),
        "runs": runs,
        "accuracy": accuracy_result,
        "decode": decode_result,
        "paired": paired_result,
        "served_evaluation": served_evaluation(ctx.model_dir),
        "failures": failures,
        "seed_note": "torchvision resnet101(weights=None) with a 5-class head: ImageNet weights are not available "
                     "offline; speed does not depend on the weights, so no accuracy is claimed for the seed",
    }


def draft_decode(data: bytes, size: int) -> torch.Tensor:
    """What serving (since issue 18) and training (since issue 19) decode: JPEG at reduced scale (PIL ``draft``),
    skipping the DCT detail that the resize to ``size`` would throw away anyway (1/2, 1/4, 1/8, never below
    ``size``)."""
    from ml.data import decode

    return decode(data, size, draft=True)[0]


def full_decode(data: bytes, size: int) -> torch.Tensor:
    """The decode before the draft: every pixel at full scale, then the resize."""
    from ml.data import decode

    return decode(data, size)[0]


def decode(photos_dir: str, size: int = 224, iterations: int = 40,
           upscaled: tuple[int, int] = (1280, 960)) -> dict[str, Any]:
    """JPEG decode alone: at full scale against the reduced-scale one (``shipped`` in the result is the full-scale
    decode, the one shipped before the draft), on the photos as they are and on the same photos re-encoded at
    ``upscaled`` (a phone-camera-like size; the ABID copy here is already 224 px)."""
    import io

    from PIL import Image

    files = common.photo_files(Path(photos_dir), iterations)
    native = [f.read_bytes() for f in files]
    large = []
    for body in native:
        with Image.open(io.BytesIO(body)) as image:
            buffer = io.BytesIO()
            image.convert("RGB").resize(upscaled, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
            large.append(buffer.getvalue())
    with Image.open(io.BytesIO(native[0])) as first:
        native_size = first.size
    rows = []
    for label, bodies in ((f"{native_size[0]}x{native_size[1]} (as stored)", native),
                          (f"{upscaled[0]}x{upscaled[1]} (re-encoded)", large)):
        shipped = common.time_calls(lambda i, b=bodies: full_decode(b[i % len(b)], size), len(bodies), 3)
        drafted = common.time_calls(lambda i, b=bodies: draft_decode(b[i % len(b)], size), len(bodies), 3)
        difference = max(float((full_decode(b, size).float() - draft_decode(b, size).float()).abs().mean())
                         for b in bodies[:8])
        rows.append({"photo": label, "bytes_mean": int(sum(map(len, bodies)) / len(bodies)),
                     "shipped_p50_ms": round(common.percentile(shipped, 50) * 1000, 3),
                     "draft_p50_ms": round(common.percentile(drafted, 50) * 1000, 3),
                     "mean_abs_pixel_difference": round(difference, 2)})
    return {"size": size, "rows": rows}
