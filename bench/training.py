"""Training: images per second of the training loop with its data loading, and of the data loading alone, for
our recipe (``ml.train.train_one_epoch`` on the decoded-once uint8 cache) and for the seed's (ResNet-101, every
photo decoded by PIL through a DataLoader at every step, SGD on every layer). If the loader alone is not much
faster than the loop, the loader is the bottleneck.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench import common


def ours(train_dir: str, steps: int = 10, warmup: int = 2, extra_args: list[str] | None = None) -> dict[str, Any]:
    """The real loop of ml.train (model, optimizer and state built as ml.train.main builds them)."""
    from ml import data as mldata
    from ml import train as mltrain
    from ml.health import TrainingMonitor
    from ml.model import ModelConfig
    from ml.profiling import StepProbe

    args = mltrain.parse_args(["--train", train_dir, "--log-interval", "1000000", *(extra_args or [])])
    device = torch.device("cpu")
    config = ModelConfig(num_classes=args.max_count + 1 + int(args.overflow), overflow=args.overflow,
                         image_size=args.image_size)
    records, _ = mldata.abid.scan_folder(Path(train_dir))
    records = records[: args.batch_size * (steps + warmup)]
    started = time.perf_counter()
    cached = mldata.load_images(Path(train_dir), args.image_size, records)
    decode_s = time.perf_counter() - started
    targets = (mltrain.targets_for(cached.quantities, args.max_count, args.overflow),
               mltrain.product_targets(cached.records, args.max_count))
    batches = mltrain.shard(mltrain.epoch_order(len(cached.records), args.seed, 0), 0, 1, args.batch_size)
    network, model, ema, optimizer = mltrain.build_training(args, config.num_classes, device, len(batches))
    state = {"config": config, "epoch": 0, "step": 0, "global_step": 0, "lr": args.lr,
             "total_steps": len(batches) * args.epochs,
             "warmup_steps": 1, "augment_rng": torch.Generator().manual_seed(args.seed), "network": network,
             "ema": ema, "monitor": TrainingMonitor(log=lambda *a, **k: None), "probe": StepProbe(device)}

    def loop(chosen: list[torch.Tensor]) -> float:
        started = time.perf_counter()
        mltrain.train_one_epoch(model, optimizer, mltrain.memory_batches(cached, targets, chosen, 0), len(chosen),
                                mltrain.StopVote(device, 1), args, state, device, None, 0, 1)
        return time.perf_counter() - started

    loop(batches[:warmup])
    loop_s = loop(batches[warmup : warmup + steps])
    timed = batches[warmup : warmup + steps]
    images = sum(len(b) for b in timed)

    # The loader alone: exactly the per-step data work of train_one_epoch, without the model.
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for index in timed:
        batch = mldata.normalize(cached.images[index], config.mean, config.std)
        if args.augment:
            batch = mldata.augment(batch, generator, args.jitter)
        batch = batch.contiguous(memory_format=torch.channels_last)
        _ = targets[0][index], targets[1][index]
    loader_s = time.perf_counter() - started
    return {
        "recipe": "ours",
        "batch_size": args.batch_size,
        "freeze_blocks": args.freeze_blocks,
        "steps": len(timed),
        "loop_images_per_s": round(images / loop_s, 2),
        "loader_images_per_s": round(images / loader_s, 2),
        "loader_share_of_loop": round(loader_s / loop_s, 4),
        # Paid once per job (the cache), not per epoch: shown so its cost is not hidden.
        "decode_once_images_per_s": round(len(cached.records) / decode_s, 2),
    }


def seed(train_dir: str, steps: int = 3, warmup: int = 1, batch_size: int = 32, workers: int = 0) -> dict[str, Any]:
    from bench import seed as seed_design
    from ml import abid

    records, _ = abid.scan_folder(Path(train_dir))
    records = records[: batch_size * (steps + warmup)]
    files = [Path(train_dir) / r.image_key for r in records]
    quantities = [r.quantity for r in records]
    loader = torch.utils.data.DataLoader(seed_design.PhotoDataset(files, quantities), batch_size=batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    network, optimizer = seed_design.training_parts()
    network.train()
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(network(images), labels).backward()
        optimizer.step()

    iterator = iter(loader)
    for _ in range(warmup):
        step(*next(iterator))
    started = time.perf_counter()
    seen = 0
    for _ in range(steps):
        images, labels = next(iterator)
        step(images, labels)
        seen += len(labels)
    loop_s = time.perf_counter() - started

    started = time.perf_counter()
    loaded = 0
    for index, (images, _labels) in enumerate(loader):
        loaded += len(images)
        if index + 1 >= steps:
            break
    loader_s = time.perf_counter() - started
    return {
        "recipe": "seed",
        "batch_size": batch_size,
        "loader_workers": workers,
        "steps": steps,
        "loop_images_per_s": round(seen / loop_s, 2),
        "loader_images_per_s": round(loaded / loader_s, 2),
        "loader_share_of_loop": round((loader_s / loaded) / (loop_s / seen), 4),
    }


def run(ctx: common.Context) -> dict[str, Any]:
    env = {"CUDA_VISIBLE_DEVICES": ""}
    results: dict[str, Any] = {"train_dir": str(ctx.train_dir), "runs": [], "failures": []}
    plans = [
        ("bench.training:seed", {"train_dir": str(ctx.train_dir), "steps": ctx.scale(3, 1),
                                 "warmup": ctx.scale(1, 0), "batch_size": ctx.scale(32, 4)}),
        ("bench.training:ours", {"train_dir": str(ctx.train_dir), "steps": ctx.scale(10, 1),
                                 "warmup": ctx.scale(2, 0),
                                 "extra_args": [] if not ctx.quick else ["--batch-size", "4"]}),
    ]
    for target, kwargs in plans:
        try:
            result = common.run_child(target, kwargs, threads=ctx.threads, env=env, timeout=900)
        except common.ChildFailed as error:
            results["failures"].append({"target": target, "error": str(error)[-1500:]})
            print(f"  training {target}: FAILED ({str(error).splitlines()[0]})", flush=True)
            continue
        results["runs"].append(result)
        print(f"  training {result['recipe']}: loop {result['loop_images_per_s']:.1f} img/s, loader alone "
              f"{result['loader_images_per_s']:.1f} img/s, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return results
