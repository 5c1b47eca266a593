"""``python -m bench [--quick] [--only serving,training,coldstart,ingest,countfaults,data]``: run the benchmarks
and write ``bench/results/<name>.json``, ``summary.json`` and ``README.md`` (the table, with the machine it came
from).

Our served model is ``models/abid-effnet-lite0`` (``--model-dir``); without one, a tiny model is trained on the
shipped sample first so that the harness still runs, and the results say so (its speed is the served
architecture's; its accuracy means nothing). Held-out photos default to the test split of ``runs/split``
(written by ``python -m ml.data split``) when present, else the shipped sample.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import common, table

BENCHMARKS = ("serving", "training", "coldstart", "ingest", "countfaults", "data")


def tiny_model(workdir: Path) -> Path:
    """A real but barely trained model of the served architecture, for machines without the served one."""
    model_dir = workdir / "model"
    command = [sys.executable, "-m", "ml.train", "--train", str(common.SAMPLE_DIR), "--model-dir", str(model_dir),
               "--output-data-dir", str(workdir / "output"), "--checkpoint-dir", str(workdir / "checkpoints"),
               "--epochs", "1", "--limit", "64", "--log-interval", "1000"]
    result = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True, timeout=900, check=False,
                            env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    if result.returncode != 0 or not (model_dir / "model.pth").exists():
        raise SystemExit(f"could not train the stand-in model:\n{(result.stdout + result.stderr)[-3000:]}")
    return model_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few iterations of everything: a smoke run")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--model-dir", type=Path, default=common.SERVED_MODEL_DIR)
    parser.add_argument("--test-dir", type=Path, default=None, help="held-out ABID folder (default: see above)")
    parser.add_argument("--train-dir", type=Path, default=None, help="training ABID folder (int8 calibration too)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    parser.add_argument("--variants", default="", help="serving variants of our model, comma-separated "
                        "(steps joined by '+', see bench/variants.py), e.g. eager,static+cl+compile")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; choose from {BENCHMARKS}")
    started = time.perf_counter()
    split = common.SPLIT_DIR
    ctx = common.Context(
        quick=args.quick,
        out_dir=args.out,
        model_dir=args.model_dir,
        test_dir=args.test_dir or (split / "test" if (split / "test" / "metadata").is_dir() else common.SAMPLE_DIR),
        train_dir=args.train_dir or (split / "train" if (split / "train" / "metadata").is_dir() else common.SAMPLE_DIR),
        threads=args.threads,
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        model_provenance="the served model" if args.model_dir == common.SERVED_MODEL_DIR
        else "a model dir given with --model-dir",
    )
    machine = common.machine()
    busy = common.busy_processes()
    print(f"bench: {', '.join(chosen)}{' (quick)' if args.quick else ''} on {machine.get('cpu_model')}, "
          f"{machine.get('cpus')} CPUs, torch {machine.get('torch')}", flush=True)
    if busy:
        print(f"bench: other heavy work is running and will bias the figures: {busy}", flush=True)

    scratch = tempfile.TemporaryDirectory(prefix="bench-model-")
    needs_model = any(name in chosen for name in ("serving", "coldstart"))
    if needs_model and not (ctx.model_dir / "model.pth").exists():
        print(f"bench: no model in {ctx.model_dir}; training a tiny stand-in on the sample", flush=True)
        ctx.model_dir = tiny_model(Path(scratch.name))
        ctx.model_provenance = "tiny stand-in trained by the bench (the served model was absent): accuracy is not "\
                               "the served model's"
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    previous = common.read_json(ctx.out_dir / "summary.json") if not args.quick else None
    try:
        for name in chosen:
            print(f"bench: {name}", flush=True)
            began = time.perf_counter()
            try:
                module = importlib.import_module(f"bench.{name}")
                result = module.run(ctx)
            except Exception:
                errors[name] = traceback.format_exc()
                print(f"bench: {name} failed:\n{errors[name]}", flush=True)
                common.write_json(ctx.out_dir / f"{name}.json", {"error": errors[name]})
                continue
            result["seconds"] = round(time.perf_counter() - began, 1)
            result["quick"] = args.quick
            results[name] = result
            if name != "ingest" or not (ctx.out_dir / "ingest.json").exists():
                common.write_json(ctx.out_dir / f"{name}.json", result)
    finally:
        scratch.cleanup()
    # Benchmarks not run this time keep their latest full results in the table.
    for name in BENCHMARKS:
        if name not in results and name not in errors and previous and name in (previous.get("included") or []):
            document = common.read_json(ctx.out_dir / f"{name}.json")
            if document and "error" not in document and not document.get("quick"):
                results[name] = document
    run = {"quick": args.quick, "threads": args.threads or machine.get("torch_threads_default"),
           "seconds": time.perf_counter() - started, "busy": busy, "errors": errors, "ran": chosen}
    summary = {"machine": machine, "run": run, "included": sorted(results), "headline": table.headline(results)}
    common.write_json(ctx.out_dir / "summary.json", summary)
    (ctx.out_dir / "README.md").write_text(table.render(results, machine, run))
    print(f"bench: wrote {ctx.out_dir}/README.md and summary.json in {run['seconds']:.0f} s", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
