"""The Markdown report (bench/results/README.md) and the headline figures (summary.json) from the results."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def seed_p50(serving: dict[str, Any]) -> float | None:
    """The seed's batch-1 p50 on CPU: the mean of its runs (measured first and last in the same run)."""
    values = [r["batch1"]["p50_ms"] for r in serving.get("runs", []) if r["system"] == "seed" and r["device"] == "cpu"]
    return sum(values) / len(values) if values else None


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue's goals are judged by."""
    out: dict[str, Any] = {}
    serving = results.get("serving")
    if serving:
        base = seed_p50(serving)
        ours = [r for r in serving["runs"] if r["system"] == "ours" and r["device"] == "cpu"]
        accuracy = ((serving.get("accuracy") or {}).get("variants")) or {}
        eager = accuracy.get("eager", {}).get("headline", {}).get("accuracy")

        def keeps_accuracy(variant: str) -> bool:
            value = accuracy.get(variant, {}).get("headline", {}).get("accuracy")
            # One photo in a hundred is the tolerance: the held-out split is ~900 photos, ~600 in 1..5.
            return value is not None and eager is not None and value >= eager - 0.01

        eligible = [r for r in ours if keeps_accuracy(r["variant"])]
        paired = serving.get("paired") or {}
        paired_p50 = {label: s["p50_ms"] for label, s in (paired.get("batch1") or {}).items()}

        def p50(r: dict[str, Any]) -> float:
            # The in-turns figure where there is one: it is the one that noise cannot skew against the seed.
            return paired_p50.get(f"ours {r['variant']}", r["batch1"]["p50_ms"])

        if paired_p50.get("seed ResNet-101"):
            base = paired_p50["seed ResNet-101"]
        best = min(eligible or ours, key=p50) if ours else None
        shipped = next((r for r in ours if r["variant"] == "eager"), None)
        out["serving"] = {
            "method": "in turns, one process (bench.serving.paired)" if paired_p50 else "separate processes",
            "seed_batch1_p50_ms": round(base, 2) if base else None,
            "ours_shipped_batch1_p50_ms": p50(shipped) if shipped else None,
            "speedup_shipped": round(base / p50(shipped), 2) if base and shipped else None,
            "best_variant": best["variant"] if best else None,
            "best_batch1_p50_ms": p50(best) if best else None,
            "speedup_best": round(base / p50(best), 2) if base and best else None,
            "best_keeps_accuracy": keeps_accuracy(best["variant"]) if best else None,
            "goal_speedup": 8,
            "held_out_accuracy_eager": eager,
            "held_out_accuracy_best": accuracy.get(best["variant"], {}).get("headline", {}).get("accuracy")
            if best else None,
            "threads": best["threads"] if best else None,
        }
    training = results.get("training")
    if training:
        out["training"] = {r["recipe"]: {k: r[k] for k in ("loop_images_per_s", "loader_images_per_s",
                                                           "loader_share_of_loop")} for r in training["runs"]}
    coldstart = results.get("coldstart")
    if coldstart:
        imports = [i for i in coldstart["imports"] if "import_ms_p50" in i]
        out["coldstart"] = {
            "slowest_import": max(imports, key=lambda i: i["import_ms_p50"]) if imports else None,
            "package_zip_bytes": coldstart["package"]["zip_bytes"],
            "count_warm_ms_per_record_p50": (coldstart.get("count") or {}).get("warm_ms_per_record_p50"),
        }
    ingest = results.get("ingest")
    if ingest and isinstance(ingest.get("variants"), list):
        # A rerun copies nothing (the idempotent path): not a copy throughput.
        copying = [v for v in ingest["variants"] if v.get("objects_copied", 1)]
        best = max(copying, key=lambda v: v.get("images_per_s", 0), default=None)
        out["ingest"] = {"best_variant": best.get("variant"), "images_per_s": best.get("images_per_s")} if best else {}
    data = results.get("data")
    if data and "staging" in data:
        out["data"] = {"staging_speedup": data["staging"]["speedup"], "goal": data["staging"]["goal"],
                       "goal_met": data["staging"]["goal_met"],
                       "shard_input_mode": data["recommendation"]["shard_channels"]}
    faults = results.get("countfaults")
    if faults:
        out["countfaults"] = {k: faults.get(k) for k in ("stall_share", "records_per_s", "lost_share")}
    return out


def render(results: dict[str, Any], machine: dict[str, Any], run: dict[str, Any]) -> str:
    lines = ["# Benchmarks", ""]
    lines.append(f"Latest `python -m bench{' --quick' if run.get('quick') else ''}` run: {machine.get('date')} on "
                 f"`{machine.get('hostname')}`, {machine.get('cpu_model') or '?'} ({machine.get('architecture')}), "
                 f"{machine.get('cpus')} CPUs, GPU: {machine.get('cuda') or 'none'}; Python {machine.get('python')}, "
                 f"torch {machine.get('torch')}, {run.get('threads')} torch threads per process; "
                 f"load average at start {' '.join(machine.get('load_average_at_start', []))}; "
                 f"total {run.get('seconds', 0):.0f} s.")
    if run.get("quick"):
        lines += ["", "**Quick (smoke) mode: a handful of iterations; these figures are not measurements.**"]
    if run.get("busy"):
        lines += ["", "Other heavy work was running during this run (figures are biased): "
                  + "; ".join(f"`{b[:100]}`" for b in run["busy"])]
    lines.append("")
    lines += _serving(results.get("serving"))
    lines += _training(results.get("training"))
    lines += _coldstart(results.get("coldstart"))
    lines += _ingest(results.get("ingest"))
    lines += _countfaults(results.get("countfaults"))
    lines += _data(results.get("data"))
    for name, error in (run.get("errors") or {}).items():
        lines += [f"**{name} failed:** `{error.splitlines()[0][:200] if error else ''}` (see {name}.json)", ""]
    return "\n".join(lines).rstrip() + "\n"


def _serving(serving: dict[str, Any] | None) -> list[str]:
    if not serving:
        return []
    base = seed_p50(serving)
    accuracy = ((serving.get("accuracy") or {}).get("variants")) or {}
    threads = next((r["threads"] for r in serving["runs"]), None)
    paired = serving.get("paired") or {}
    paired_p50 = {label: s["p50_ms"] for label, s in (paired.get("batch1") or {}).items()}
    paired_seed = paired_p50.get("seed ResNet-101")
    lines = [f"## Serving ({threads} CPU threads)", "",
             "Per photo through the serving functions: `input_fn` (JPEG decode) + `predict_fn` + `output_fn`, "
             "one fresh process per model. Batches are JSON bodies of base64 photos (the batch contract). "
             "Accuracy: the held-out split, photos with 1–5 objects, the served answer (as `ml.evaluate`'s "
             "headline); agreement: same answer as the eager model. \"In turns\": the seed and each of "
             "our variants loaded in one process and called alternately on the same photo "
             f"({paired.get('iterations', 0)} rounds), so a slow spell of this shared machine hits all alike "
             "and the ratio holds; the separate-process columns can drift apart.", ""]
    rows = []
    for r in serving["runs"]:
        acc = accuracy.get(r["variant"], {}) if r["system"] == "ours" and r["device"] == "cpu" else {}
        key = "seed ResNet-101" if r["system"] == "seed" else f"ours {r['variant']}"
        in_turns = paired_p50.get(key) if r["device"] == "cpu" else None
        rows.append([
            r["label"], r["batch1"]["p50_ms"], r["batch1"]["p95_ms"], r["batch1_stages_p50_ms"]["input_fn"],
            r["batch1_stages_p50_ms"]["predict_fn"],
            f"{r['best']['photos_per_s']:.1f} @ {r['best']['batch_size']}" if r.get("best") else "–",
            r["peak_rss_mib"], f"{base / r['batch1']['p50_ms']:.1f}x" if base and r["device"] == "cpu" else "–",
            in_turns, f"{paired_seed / in_turns:.1f}x" if in_turns and paired_seed else "–",
            _fmt(acc.get("headline", {}).get("accuracy"), 3) if acc else "–",
            _fmt(acc.get("agreement_with_first"), 3) if acc else "–",
            f"{r['serverless']['usd_per_1000_photos']:.4f}" if r.get("serverless") else "–",
        ])
    lines += _table(["model", "batch 1 p50 ms", "p95 ms", "decode p50 ms", "forward p50 ms",
                     "best photos/s @ batch", "peak RSS MiB", "vs seed (p50)", "in turns p50 ms",
                     "vs seed (in turns)", "held-out acc.", "agreement", "serverless $ / 1,000 photos"], rows)
    lines.append("")
    priced = next((r["serverless"] for r in serving["runs"] if r.get("serverless")), None)
    if priced:
        lines.append(f"Serverless cost: 1,000 photos sent one per request to a {priced['memory_mb']:,} MB serverless "
                     f"endpoint (the stack's default), billed for the batch-1 p50 time at "
                     f"${priced['usd_per_second']:.7f} a second plus "
                     f"${priced['usd_per_gb_data']} per GB in and out (US East list prices, `bench/serving.py`; "
                     "assumes the endpoint's CPUs are as fast as these). `+tta8`: the served variant averaging the 8 "
                     "symmetries, 8 forward passes per photo.")
        lines.append("")
    head = headline({"serving": serving}).get("serving", {})
    if head.get("speedup_best"):
        met = "met" if head["speedup_best"] >= 8 and head.get("best_keeps_accuracy") else "not met"
        lines.append(f"Goal (>= 8x the seed per photo at batch 1, held-out accuracy within 1 point of the eager "
                     f"model's; judged on the {head['method']} figures): **{met}**: fastest variant that "
                     f"keeps accuracy is `{head['best_variant']}` at {head['best_batch1_p50_ms']:.1f} ms, "
                     f"{head['speedup_best']:.1f}x the seed's {head['seed_batch1_p50_ms']:.1f} ms; the eager model is "
                     f"{head['speedup_shipped']:.1f}x. `ml/inference.py` serves static+cl+jit on CPU.")
    acc_info = serving.get("accuracy") or {}
    if acc_info:
        lines.append(f"Accuracy measured by the bench on `{acc_info.get('test_dir')}` "
                     f"({acc_info.get('images')} photos); model: `{serving.get('model_dir')}` "
                     f"({serving.get('model_provenance')}).")
    served = serving.get("served_evaluation")
    if served:
        h = served["headline"]
        lines.append(f"The model's own evaluation report (`{served['file']}`, data `{served.get('data')}`, "
                     f"{served.get('images')} photos, TTA {served.get('tta')}): accuracy {_fmt(h.get('accuracy'), 3)}, "
                     f"RMSE {_fmt(h.get('rmse'), 3)} on counts 1–5.")
    lines.append(f"Seed: {serving.get('seed_note')}.")
    for failure in serving.get("failures", []):
        lines.append(f"- failed: {failure['label']}: `{failure['error'].strip().splitlines()[-1][:160]}`")
    lines += ["", "Throughput by batch size (photos/s):", ""]
    sizes = sorted({t["batch_size"] for r in serving["runs"] for t in r["throughput"]})
    rows = [[r["label"], *[next((f"{t['photos_per_s']:.1f}" for t in r["throughput"] if t["batch_size"] == s), "–")
                           for s in sizes]] for r in serving["runs"]]
    lines += _table(["model", *[f"batch {s}" for s in sizes]], rows)
    lines.append("")
    decode = serving.get("decode")
    if decode:
        lines += [f"JPEG decode to {decode['size']} px alone (p50): decoding every pixel at full scale against "
                  "decoding at reduced scale (PIL `draft`, what serving and training decode now):", ""]
        lines += _table(["photo", "mean bytes", "full scale ms", "draft ms", "mean abs. pixel difference"],
                        [[r["photo"], r["bytes_mean"], r["shipped_p50_ms"], r["draft_p50_ms"],
                          r["mean_abs_pixel_difference"]] for r in decode["rows"]])
        lines.append("")
    return lines


def _training(training: dict[str, Any] | None) -> list[str]:
    if not training:
        return []
    lines = ["## Training loop (CPU)", "",
             "Images per second of one training step including its data loading, and of the data loading alone. "
             "Ours: `ml.train.train_one_epoch` (EfficientNet-Lite0, stem + 5 blocks frozen, AdamW, augmentation) on "
             "photos decoded once into a uint8 cache (the one-time decode rate is shown apart). Seed: ResNet-101 "
             "fp32, every layer trained (SGD), PIL decode + transforms in a DataLoader every step.", ""]
    rows = [[r["recipe"], r["batch_size"], r["loop_images_per_s"], r["loader_images_per_s"],
             f"{r['loader_share_of_loop'] * 100:.1f} %", r.get("decode_once_images_per_s"), r["peak_rss_mib"]]
            for r in training["runs"]]
    lines += _table(["recipe", "batch", "loop img/s", "loader alone img/s", "loader share of step",
                     "decode-once img/s", "peak RSS MiB"], rows)
    lines.append("")
    by = {r["recipe"]: r for r in training["runs"]}
    if "ours" in by and "seed" in by:
        lines.append(f"Ours trains {by['ours']['loop_images_per_s'] / by['seed']['loop_images_per_s']:.1f}x as many "
                     f"images per second as the seed's recipe; its loader takes "
                     f"{by['ours']['loader_share_of_loop'] * 100:.1f} % of a step (the model is the bottleneck).")
    for failure in training.get("failures", []):
        lines.append(f"- failed: {failure['target']}: `{failure['error'].strip().splitlines()[-1][:160]}`")
    lines.append("")
    return lines


def _coldstart(coldstart: dict[str, Any] | None) -> list[str]:
    if not coldstart:
        return []
    package = coldstart["package"]
    lines = ["## Lambda cold start", "",
             f"Import of each handler module in a fresh interpreter (median); a bare interpreter starts in "
             f"{coldstart['interpreter_ms_p50']:.0f} ms. Note: {coldstart['note']}.", ""]
    rows = [[i["module"], i.get("import_ms_p50", "–"), i.get("process_ms_p50", "–"),
             i.get("modules_loaded", i.get("error", ""))] for i in coldstart["imports"]]
    lines += _table(["handler module", "import ms", "process ms", "modules loaded"], rows)
    lines += ["", f"Code asset (shared by every function): {package['files']} files, "
              f"{package['bytes'] / 1024:.0f} KiB, {package['zip_bytes'] / 1024:.0f} KiB zipped; by folder (KiB): "
              + ", ".join(f"{k} {v / 1024:.0f}" for k, v in package["bytes_by_folder"].items() if v)
              + f". Note: {package['note']}."]
    count = coldstart.get("count")
    if count:
        lines.append(f"Count Lambda, {count['photos']} uploads in SQS batches of {count['batch_size']} against "
                     f"local stand-ins ({count['stand_ins']}): {count['warm_ms_per_record_p50']} ms per record warm "
                     f"(p50), of which the endpoint call alone is {count['endpoint_direct_ms_p50']} ms; first batch "
                     f"{count['first_batch_ms_per_record']} ms per record; handler import in-process "
                     f"{count['handler_import_ms']} ms; {count['records_stored']} records stored, "
                     f"{count['batch_item_failures']} batch item failures, statuses {count['statuses']}.")
    elif coldstart.get("count_error"):
        lines.append(f"Count Lambda per record: failed: `{coldstart['count_error'].strip().splitlines()[-1][:200]}`")
    lines.append("")
    return lines


def _ingest(ingest: dict[str, Any] | None) -> list[str]:
    if not ingest:
        return []
    lines = ["## Ingestion copy throughput", "", f"From `bench/ingest.py`: {ingest.get('stand_in', '')}.", ""]
    variants = ingest.get("variants")
    if isinstance(variants, list) and variants:
        rows = [[v.get("variant"), v.get("images"), v.get("images_per_s"), v.get("objects_per_s"),
                 v.get("worker_cpu_ms_per_image"), v.get("failures")] for v in variants]
        lines += _table(["variant", "images", "images/s", "objects/s", "worker CPU ms/image", "failures"], rows)
    else:
        scalars = {k: v for k, v in ingest.items() if isinstance(v, int | float | str)}
        lines += _table(["figure", "value"], [[k, v] for k, v in scalars.items()])
    implications = ingest.get("implications")
    if isinstance(implications, dict):
        lines += ["", "Scaled to AWS (assumptions in ingest.json): "
                  + ", ".join(f"{k} {v}" for k, v in implications.items() if isinstance(v, int | float)) + "."]
    lines.append("")
    return lines


def _countfaults(faults: dict[str, Any] | None) -> list[str]:
    if not faults:
        return []
    lines = ["## Counting under endpoint faults", "", f"From `bench/countfaults.py`: {faults.get('stand_in', '')}.", ""]
    figures = ("records", "stall_share", "stalled_calls", "records_per_s", "lost", "lost_share", "invocations",
               "invocations_past_timeout", "deliveries", "longest_invocation_s")
    lines += _table(["figure", "value"], [[name, faults.get(name)] for name in figures])
    lines.append("")
    return lines


def _data(data: dict[str, Any] | None) -> list[str]:
    if not data or "staging" not in data:
        return []
    staging, full = data["staging"], data["extrapolation"]
    lines = ["## Training data: one object per photo against shards", "",
             f"From `bench/data.py`: {data['stand_in']}. Photos: {data['photos_from']}; mean "
             f"{data['photo_bytes_mean']:,} B per photo, {data['metadata_bytes_mean']:,} B per metadata document; "
             f"{data['shards']} shards of {data['shard_photos']:,} photos ({data['shard_bytes_mean'] / 1e6:.1f} MB "
             f"each). Staging: {data['concurrency_note']}.", ""]
    layouts = (("one object per photo", staging["per_object"]),
               (f"shards (median of {len(staging['shards'].get('runs_seconds', [1]))})", staging["shards"]))
    rows = [[name, row["objects"], row["seconds"], row["photos_per_s"], row["objects_per_s"], row["mb_per_s"]]
            for name, row in layouts]
    lines += _table([f"stage {staging['photos']:,} photos", "objects", "seconds", "photos/s", "objects/s", "MB/s"],
                    rows)
    met = "met" if staging["goal_met"] else "NOT met"
    lines += ["", f"Shards stage **{staging['speedup']}x** faster (goal >= {staging['goal']}x: **{met}**).", "",
              f"Input pipeline, {data['pipeline']['worker']}: read + `ml.data.decode` to "
              f"{data['pipeline']['image_size']} px:", ""]
    lines += _table(["source", "photos", "photos/s (median)", "every run, in turns"],
                    [[c["case"], c["photos"], c["photos_per_s"],
                      ", ".join(f"{v:,.0f}" for v in c.get("runs_photos_per_s", [c["photos_per_s"]]))]
                     for c in data["pipeline"]["cases"]])
    replicated, sharded = full["per_object_fully_replicated"], full["shards_sharded_by_s3_key"]
    lines += ["", f"Extrapolated to {full['photos']:,} photos on {full['hosts']} hosts (measured "
              f"{full['measured_fixed_ms_per_object']} ms fixed per object and "
              f"{full['measured_byte_rate_mb_per_s']} MB/s; {full['assumption']}): one object per photo, "
              f"FullyReplicated: {replicated['objects_per_host']:,} objects and {replicated['gb_per_host']} GB per "
              f"host, **{replicated['minutes_per_host']} min** per host; "
              f"shards, ShardedByS3Key: {sharded['shards_per_host']} of {sharded['shards']} shards and "
              f"{sharded['gb_per_host']} GB per host, **{sharded['minutes_per_host']} min** per host "
              f"({full['ratio']}x).", "",
              f"InputMode for shard channels: **{data['recommendation']['shard_channels']}**: "
              f"{data['recommendation']['why']}.", ""]
    return lines
