"""The training loop behind `tracestore train`: a probe (lstm, gnn, hybrid, or the seed's seed-lstm and
seed-gnn-lstm) trained on a store's traces to predict their score, one process or data-parallel under
`torchrun`.

What a run leaves in RUN_DIR:

- `split.json`: the train/validation/test ids (70/15/15 by default, deterministic in seed and fractions,
  stratified, grouped by `group_pattern` or `group_field`; see `split.py`);
- `metrics.csv`: one row per epoch (losses, validation metrics, traces/s);
- `summary.json`: final and best validation metrics (`val_auroc`, `val_accuracy` for classification,
  `val_mse`, `val_pearson` for regression), best epoch (by validation AUROC, or MSE; never one whose
  metrics are NaN), and the **test** metrics of the best epoch's weights: `test_auroc`, `test_accuracy`,
  `test_precision`, `test_recall`, `test_f1` at `threshold`, the probability cut chosen on validation by
  Youden's J (classification), or `test_mse`, `test_pearson` (regression); sizes, wall time;
- `curves.png`: loss and metric curves, drawn when the run ends (also after a `max_steps` stop);
- `checkpoints/best.pt`: the weights of the best epoch so far (what the test split is scored with);
- `checkpoints/last.pt`: written atomically after every epoch (and every `checkpoint_every` steps); with
  `resume=True` the run continues from it, including each rank's position in its loader, and trains exactly
  the traces an uninterrupted run would, epoch by epoch (also after a stop on an epoch's last step).

Training stops early after `patience` epochs without a better validation figure (default 5; 0 turns this
off). The test split is scored once, when the run ends (not after a `max_steps` budget stop, which `resume`
continues). With `seeds=K` the run is repeated K times on the same split with initialisation and order
seeds `seed, seed+1, ...` under RUN_DIR/seedN/, and RUN_DIR/summary.json holds the mean and standard
deviation of every test metric (`test_auroc_mean`, `test_auroc_std`, ...).

With skewed labels (beyond 2:1, `balance="auto"`, the default) the loss weighs the positive class by
n_negative / n_positive (`BCEWithLogitsLoss(pos_weight=)`), and the run says so; `balance="weight"` always
does, `balance="none"` never.

A training loss that is not finite stops the run with TrainingDivergedError (before that step is taken).

Classification labels are `score >= threshold` (0.5 by default: scores in [0, 1] such as a hallucination
probability or a 0/1 label), or with `positive_below` the seed pipeline's rule `score < positive_below`
(label 1 = hallucination = BLEURT score < 0.5); traces whose score is NaN take no part (counted in the
summary as `n_unscored`).

Data parallel: under `torchrun` (WORLD_SIZE > 1) the process group is gloo on CPU and NCCL on CUDA, each
rank streams its own shard through `TraceLoader(rank=, world_size=)`, gradients are averaged by DDP, ranks
that run out of batches first are shadowed by `Join`, and validation predictions of all ranks are
gathered so that every metric is computed on the whole validation set.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, TrainConfigError, TrainingDivergedError
from . import metrics as M
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .models import GRAPH_MODELS, MODEL_NAMES, build_model
from .rundir import atomic_text, json_default, plot_curves, write_metrics
from .split import Split, make_split

__all__ = ["TrainConfig", "train"]

TASKS = ("classification", "regression")
BALANCE = ("auto", "weight", "none")
#: label skew (majority : minority) beyond which balance="auto" weighs the positive class
BALANCE_RATIO = 2.0
BEST_NAME = "best.pt"
#: (weight_decay, dropout) of each model when not given. lstm: chosen on validation only (mean best validation
#: AUROC over 3 seeds) over hidden {32, 64, 128} x dropout {0.1, 0.3, 0.5} x weight decay {0.01, 0.1, 1} x lr
#: {1e-3, 3e-3} on the demo set (0.742 -> 0.763), confirmed on a synthetic 20%-positive set (0.830 -> 0.852)
REGULARISATION: dict[str, tuple[float, float]] = {"lstm": (1.0, 0.5)}
DEFAULT_REGULARISATION = (1e-2, 0.1)


@dataclass
class TrainConfig:
    """Options of one training run (the flags of `tracestore train`).

    Parameters
    ----------
    store : str
        URL or path of the store.
    out : str
        Run directory (created).
    model : {"lstm", "gnn", "hybrid", "seed-lstm", "seed-gnn-lstm"}
        The project's probes, or the seed pipeline's two models (models.py).
    task : {"classification", "regression"}
    epochs, batch_size, lr : training schedule (AdamW); `epochs` is the most epochs, see `patience`.
    weight_decay, dropout : float, optional
        Regularisation; default the model's own (REGULARISATION: lstm 1.0 and 0.5, chosen on validation
        splits of the demo set and of a synthetic set; 0.01 and 0.1 for the others).
    patience : int
        Stop after this many epochs without a better validation AUROC (classification) or MSE (regression);
        0: train all `epochs`.
    device : str
        "cpu", "cuda" or "cuda:N"; under torchrun with "cuda", rank r uses cuda:LOCAL_RANK.
    resume : bool
        Continue from RUN_DIR/checkpoints/last.pt.
    val_fraction, test_fraction : shares of validation and test (default 0.15 each: the seed's 70/15/15).
    seed : int
        Seed of the initialisation and of the training order; also of the split unless `split_seed`.
    split_seed : int, optional
        Seed of the split (default: `seed`). `seeds` keeps it fixed while varying `seed`.
    seeds : int
        Repeat the run this many times with seeds seed, seed+1, ... on one split (RUN_DIR/seedN/) and report
        mean and standard deviation of the test metrics.
    group_pattern : str, optional
        Regular expression whose first group names an id's group (e.g. the prompt of several sampled
        answers); a group's traces all land on one side of the split.
    group_field : str, optional
        Instead, a field of the store (e.g. `question_id`) whose value names a trace's group.
    balance : {"auto", "weight", "none"}
        Positive-class weight in the loss for skewed labels (module docstring).
    hidden : model width.
    graph_layer : int, optional
        Layer whose attention graph the gnn reads; default the middle layer (num_layers // 2).
    threshold : float
        Classification label is score >= threshold.
    positive_below : float, optional
        Instead: label 1 is score < positive_below (the seed pipeline's hallucination = BLEURT < 0.5).
    bf16 : bool
        bfloat16 autocast on CUDA (ignored, with a note in the summary, on CPU).
    num_workers : int
        Loader worker processes.
    checkpoint_every : int
        Also checkpoint every this many steps inside an epoch (0: only at epoch ends).
    max_steps : int, optional
        Stop (with a checkpoint) after this many optimizer steps in total: a budgeted run that `resume`
        continues.
    record_ids : bool
        Write RUN_DIR/ids/epochNNN.rankR.txt, the ids each rank trained on, in order (audit of data-parallel
        sharding and of resume: a resumed run's files equal an uninterrupted run's, epoch by epoch).
    progress : bool
        tqdm bar per epoch on rank 0.
    """

    store: str
    out: str
    model: str = "lstm"
    task: str = "classification"
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float | None = None
    device: str = "cpu"
    resume: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    split_seed: int | None = None
    seeds: int = 1
    patience: int = 5
    group_pattern: str | None = None
    group_field: str | None = None
    balance: str = "auto"
    hidden: int = 128
    dropout: float | None = None
    graph_layer: int | None = None
    threshold: float = 0.5
    positive_below: float | None = None
    bf16: bool = False
    num_workers: int = 0
    checkpoint_every: int = 0
    max_steps: int | None = None
    record_ids: bool = False
    progress: bool = True
    #: options that change the model or the data; a resumed run must match them
    FIXED: ClassVar[tuple[str, ...]] = ("model", "task", "val_fraction", "test_fraction", "seed", "split_seed",
                                        "hidden", "graph_layer", "threshold", "positive_below", "batch_size",
                                        "group_pattern", "group_field", "balance")

    def validate(self) -> None:
        if self.model not in MODEL_NAMES:
            raise TrainConfigError(f"--model {self.model!r}: unknown model; choose one of {', '.join(MODEL_NAMES)}")
        if self.task not in TASKS:
            raise TrainConfigError(f"--task {self.task!r}: unknown task; choose classification or regression")
        for name in ("epochs", "batch_size", "hidden", "seeds"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.patience < 0:
            raise TrainConfigError(f"--patience {self.patience}: give a number of epochs, or 0 to train all --epochs")
        if self.balance not in BALANCE:
            raise TrainConfigError(f"--balance {self.balance!r}: choose one of {', '.join(BALANCE)}")
        if not self.lr > 0:
            raise TrainConfigError(f"lr={self.lr}: must be positive (e.g. 1e-3)")
        if self.positive_below is not None and not math.isfinite(self.positive_below):
            raise TrainConfigError(f"--positive-below {self.positive_below}: give a finite score, e.g. 0.5")
        if self.positive_below is not None and self.threshold != 0.5:
            raise TrainConfigError(f"threshold={self.threshold} and positive_below={self.positive_below} are two label "
                                   f"rules; give one of them")

    @property
    def label_rule(self) -> str:
        """The classification label in words, for summaries: 'score >= 0.5' or 'score < 0.5'."""
        return label_rule_text(self.threshold, self.positive_below)

    def labels(self, scores: Any) -> Any:
        """The 0/1 labels of scores (numpy or torch, NaN scores give 0: callers leave them out)."""
        if self.positive_below is not None:
            return scores < self.positive_below
        return scores >= self.threshold

    @property
    def the_weight_decay(self) -> float:
        return REGULARISATION.get(self.model, DEFAULT_REGULARISATION)[0] if self.weight_decay is None else self.weight_decay

    @property
    def the_dropout(self) -> float:
        return REGULARISATION.get(self.model, DEFAULT_REGULARISATION)[1] if self.dropout is None else self.dropout

    @property
    def the_split_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- distributed helpers ----------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    #: a process group is open (torchrun started this process), even with one process: the DDP path runs
    distributed: bool = False

    @property
    def enabled(self) -> bool:
        return self.distributed or self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _init_dist(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # torchrun sets TORCHELASTIC_RUN_ID: then take the DDP path (process group, DistributedDataParallel) even
    # for one process, so that `torchrun --nproc_per_node=1` exercises what N processes run
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        owns = True
    return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns, distributed=True)


def _resolve_device(name: str, d: _Dist) -> torch.device:
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if d.enabled and name == "cuda":
            torch.cuda.set_device(d.local_rank)
            return torch.device("cuda", d.local_rank)
    return torch.device(name)


# -- inputs ---------------------------------------------------------------------------------------------


def _model_input(model_name: str, batch: Any, device: torch.device) -> Any:
    """What the model's forward takes, from a loader Batch: the sequences for lstm; for gnn the graph batch
    of one layer, for hybrid the graph batch of every layer (graph i * L + j is trace i at layer j)."""
    if model_name not in GRAPH_MODELS:
        return batch.sequences
    if batch.graph is None:
        raise TrainConfigError(f"model {model_name!r} needs graphs but the loader gave none; open a store with "
                               f"graphs (convert with graphs) or use --model lstm")
    return batch.graph.to(device)


def _targets(scores: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    s = scores.float()
    return cfg.labels(s).float() if cfg.task == "classification" else s


# -- the run --------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a probe as configured and return the summary (also written to RUN_DIR/summary.json on rank 0).

    Raises TrainConfigError for options that do not fit the store, CheckpointError when `resume` finds no
    usable checkpoint.
    """
    config.validate()
    if config.seeds > 1:
        return _train_seeds(config)
    d = _init_dist(config.device)
    try:
        return _train(config, d)
    finally:
        if d.owns_group:
            torch.distributed.destroy_process_group()


def _train_seeds(cfg: TrainConfig) -> dict[str, Any]:
    """`seeds=K`: K runs under RUN_DIR/seedN/ with seeds seed+N on the split of `split_seed` (default `seed`),
    and RUN_DIR/summary.json with the mean and sample standard deviation of every test and best-validation
    figure. With `resume`, finished runs are read back, interrupted ones resumed, missing ones started."""
    from dataclasses import replace

    run_dir = Path(cfg.out)
    runs: list[dict[str, Any]] = []
    for k in range(cfg.seeds):
        sub_dir = run_dir / f"seed{k}"
        sub = replace(cfg, out=str(sub_dir), seed=cfg.seed + k, split_seed=cfg.the_split_seed, seeds=1)
        done = sub_dir / "summary.json"
        if cfg.resume and done.is_file() and "epochs_done" in (old := json.loads(done.read_text())) and (
                old.get("early_stopped") or old["epochs_done"] >= cfg.epochs):
            runs.append(old)
            continue
        sub.resume = cfg.resume and checkpoint_path(sub_dir).is_file()
        runs.append(train(sub))
    keys = [k for k in runs[0] if (k.startswith("test_") or k.startswith("best_val_") or k == "threshold")
            and isinstance(runs[0][k], float)]
    s: dict[str, Any] = {"model": cfg.model, "task": cfg.task, "store": cfg.store, "run_dir": str(run_dir),
                         "seeds": cfg.seeds, "seed_values": [cfg.seed + k for k in range(cfg.seeds)],
                         "split_seed": cfg.the_split_seed, "runs": [r["run_dir"] for r in runs],
                         "n_train": runs[0]["n_train"], "n_val": runs[0]["n_val"], "n_test": runs[0]["n_test"],
                         "wall_s": float(sum(r["wall_s"] for r in runs)),
                         "epochs_done": [r["epochs_done"] for r in runs], "std": "sample (ddof=1) over seeds",
                         "config": cfg.as_dict()}
    for key in keys:
        v = np.array([r.get(key, float("nan")) for r in runs], np.float64)
        s[f"{key}_mean"] = float(v.mean())
        s[f"{key}_std"] = float(v.std(ddof=1))
        s[f"{key}_values"] = v.tolist()
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        Split.load(runs[0]["run_dir"]).save(run_dir)  # the one split every seed trained on
        atomic_text(run_dir / "summary.json", json.dumps(s, indent=1, default=json_default))
    return s


def _train(cfg: TrainConfig, d: _Dist) -> dict[str, Any]:
    from ..loader.loader import TraceLoader
    from ..store.reader import open as open_store

    t_start = time.perf_counter()
    device = _resolve_device(cfg.device, d)
    run_dir = Path(cfg.out)
    store = open_store(cfg.store)
    needs_graphs = cfg.model in GRAPH_MODELS
    if needs_graphs and not store.has_graphs:
        raise TrainConfigError(f"{store.url}: --model {cfg.model} reads attention graphs but this store has none; "
                               f"convert archives that carry graphs (or attentions to build them from), or use "
                               f"--model lstm")
    if needs_graphs and not store.has_token_hidden:
        raise TrainConfigError(f"{store.url}: --model {cfg.model} reads the tokens' hidden states as graph node "
                               f"features, and this store keeps none (converted with --tokens ids or none); "
                               f"convert again with --tokens all, or use --model lstm")
    check_label_rule(store, cfg.task, cfg.positive_below)
    L = store.num_layers
    graph_layer = cfg.graph_layer if cfg.graph_layer is not None else L // 2
    if cfg.model == "gnn" and not -L <= graph_layer < L:
        raise TrainConfigError(f"--graph-layer {graph_layer}: out of range for a store of {L} layers")

    # split: computed identically on every rank (pure function of ids, scores, seed); rank 0 records it
    split, labels = store_split(store, task=cfg.task, threshold=cfg.threshold, positive_below=cfg.positive_below,
                                val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                seed=cfg.the_split_seed, group_pattern=cfg.group_pattern, group_field=cfg.group_field)

    ckpt_file = checkpoint_path(run_dir)
    state: dict[str, Any] | None = None
    if cfg.resume:
        state = load_checkpoint(ckpt_file)
        saved = Split.load(run_dir)
        if saved.sides() != split.sides():
            raise CheckpointError(f"{run_dir}: the split recorded in split.json differs from the one this store and "
                                  f"seed give; resume with the same --store and --seed, or start a new --out")
        for k in cfg.FIXED:
            old = state["config"].get(k)
            if old != getattr(cfg, k):
                raise CheckpointError(f"{ckpt_file}: the run was started with {k}={old!r} and is resumed with "
                                      f"{k}={getattr(cfg, k)!r}; resume with the same options or start a new --out")
    elif d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for old_ckpt in (ckpt_file, ckpt_file.with_name(BEST_NAME)):
            if old_ckpt.exists():
                old_ckpt.unlink()  # a fresh run in an old directory must not resume (or test) by accident later
        split.save(run_dir)
    d.barrier()

    train_view = store.select(split.train_ids)
    val_view = store.select(split.val_ids)
    loader_kw: dict[str, Any] = dict(batch_size=cfg.batch_size, device=device, num_workers=cfg.num_workers,
                                     with_graphs=needs_graphs, rank=d.rank, world_size=d.world_size)
    if needs_graphs:
        # the hybrid reads every layer's graph; the loader's graph_layer=None means all layers
        loader_kw["graph_layer"] = graph_layer if cfg.model == "gnn" else None
    train_loader = TraceLoader(train_view, shuffle=True, seed=cfg.seed, **loader_kw)
    val_loader = TraceLoader(val_view, shuffle=False, seed=cfg.seed, **loader_kw)
    test_loader = (TraceLoader(store.select(split.test_ids), shuffle=False, seed=cfg.seed, **loader_kw)
                   if split.test_ids else None)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model: nn.Module = build_model(cfg.model, num_layers=L, hidden_size=store.hidden_size, hidden=cfg.hidden,
                                   dropout=cfg.the_dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.the_weight_decay)
    if cfg.task != "classification" and cfg.balance == "weight":
        raise TrainConfigError("--balance weight weighs the positive class of a classification; this run is a "
                               "regression (--task regression): leave --balance out")
    balance = _balance(cfg, labels, store.ids, split)
    if balance["pos_weight"] is not None and d.main and cfg.progress:
        print(f"{cfg.model}: {balance['note']}", file=sys.stderr, flush=True)
    if cfg.task == "classification" and labels is not None:
        for note in _one_class_sides(labels, store.ids, split):
            if note.startswith("train"):
                raise TrainConfigError(f"{cfg.store}: the {note}: a probe cannot learn to tell the classes apart; "
                                       f"check the scores and the label rule ({cfg.label_rule})")
            if d.main:
                print(f"{cfg.model}: note: the {note}", file=sys.stderr, flush=True)
    loss_fn: nn.Module = (nn.BCEWithLogitsLoss(pos_weight=None if balance["pos_weight"] is None else
                                               torch.tensor(balance["pos_weight"], device=device))
                          if cfg.task == "classification" else nn.MSELoss())
    best_file = ckpt_file.with_name(BEST_NAME)

    history: list[dict[str, Any]] = []
    best_val: tuple[np.ndarray, np.ndarray] | None = None  # the selected epoch's validation targets and predictions
    start_epoch, skip_steps, global_step = 0, 0, 0
    partial: dict[str, Any] = {}  # this rank's share of a resumed epoch's first part: losses, traces, ids
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        skip_steps = int(state["step_in_epoch"])
        per_rank = state["ranks"]
        # the loader's state counts traces consumed by all ranks together, so any rank's (and any world
        # size) resumes the same remainder; RNG states are per rank where the world size is unchanged
        mine = per_rank[d.rank] if len(per_rank) == d.world_size else per_rank[0]
        torch.set_rng_state(mine["rng"])
        if skip_steps:
            # with consumed == all traces (a stop on the epoch's last step), the loader's next pass is empty and
            # it then moves to the next epoch: the resumed epoch keeps its number, as in an uninterrupted run
            train_loader.load_state_dict(per_rank[0]["loader"])
            if len(per_rank) == d.world_size:
                partial = dict(mine.get("partial") or {})

    ddp_model: nn.Module = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    autocast = cfg.bf16 and device.type == "cuda"
    n_train_total, n_val_total = len(split.train_ids), len(split.val_ids)
    stopped_early = False
    early_stopped = False

    def checkpoint(epoch: int, step_in_epoch: int, part: dict[str, Any] | None = None) -> None:
        """Save the run; mid-epoch (step_in_epoch > 0) with each rank's loader position and `part`, its
        share of the epoch so far ({loss_sum, seen, ids_seen}), which resume continues from."""
        mine = {"rng": torch.get_rng_state(), "loader": train_loader.state_dict() if step_in_epoch else {},
                "partial": part if step_in_epoch and part else {}}
        ranks = d.gather(mine)
        if d.main:
            save_checkpoint(ckpt_file, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": global_step, "ranks": ranks,
                "history": history, "config": cfg.as_dict(), "world_size": d.world_size,
            })
        d.barrier()

    for epoch in range(start_epoch, cfg.epochs):
        resumed_mid_epoch = epoch == start_epoch and skip_steps > 0
        if not resumed_mid_epoch and _patience_spent(cfg, history):
            early_stopped = True  # checked before an epoch, so that a resumed run stops where it would have
            break
        if not resumed_mid_epoch:
            train_loader.set_epoch(epoch)
        step_in_epoch = skip_steps if resumed_mid_epoch else 0
        ddp_model.train()
        loss_sum, seen = 0.0, 0
        seen_ids: list[str] = []
        if resumed_mid_epoch and partial:
            # the epoch's row and ids file cover all of it, not only the part after the resume
            loss_sum, seen = float(partial.get("loss_sum", 0.0)), int(partial.get("seen", 0))
            if cfg.record_ids:
                seen_ids = _read_ids(run_dir, epoch, d.rank, int(partial.get("ids_seen", 0)))
        t0 = time.perf_counter()
        bar = _bar(cfg, d, epoch, len(train_loader))
        join = _join(ddp_model, d)
        with join:
            for batch in train_loader:
                y = _targets(batch.scores, cfg).to(device)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
                    out = ddp_model(_model_input(cfg.model, batch, device))
                loss = loss_fn(out.float(), y)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    # before the step, so that these weights are not overwritten by NaN; metrics of a diverged
                    # probe would be NaN anyway (metrics.py)
                    raise TrainingDivergedError(
                        f"{store.url}: the training loss is {loss_value} at epoch {epoch}, step {step_in_epoch + 1} "
                        f"(global step {global_step + 1}; traces {list(batch.ids[:3])}...): the probe diverged, or "
                        f"that batch holds non-finite values. Training stopped; lower --lr (now {cfg.lr:g}) and "
                        f"train again without --resume (a checkpoint restores its own learning rate), or check the "
                        f"store with `tracestore verify {store.url}`")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                b = int(y.shape[0])
                loss_sum += loss_value * b
                seen += b
                step_in_epoch += 1
                global_step += 1
                if cfg.record_ids:
                    seen_ids.extend(str(i) for i in batch.ids)
                if bar is not None:
                    el = time.perf_counter() - t0
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", traces_s=f"{seen * d.world_size / max(el, 1e-9):.0f}")
                if cfg.max_steps is not None and global_step >= cfg.max_steps:
                    stopped_early = True
                    break
                if cfg.checkpoint_every and step_in_epoch % cfg.checkpoint_every == 0:
                    # only safe when all ranks step together; Join shadows ranks that finished, so skip then
                    if not d.enabled:
                        checkpoint(epoch, step_in_epoch,
                                   _partial(cfg, run_dir, epoch, d.rank, loss_sum, seen, seen_ids))
        if bar is not None:
            bar.close()
        train_s = time.perf_counter() - t0
        # ranks step in lockstep, but one that ran out of batches before max_steps did not see the stop
        stopped_early = d.sum([float(stopped_early)], device)[0] > 0
        if stopped_early:
            # a budgeted stop: keep each rank's loader position so that resume finishes this epoch
            checkpoint(epoch, step_in_epoch, _partial(cfg, run_dir, epoch, d.rank, loss_sum, seen, seen_ids))
            break
        if cfg.record_ids:
            _write_ids(run_dir, epoch, d.rank, seen_ids)
        loss_tot, n_tot = d.sum([loss_sum, float(seen)], device)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_tot / max(n_tot, 1.0)}
        val, val_predictions = _evaluate(ddp_model, model, val_loader, cfg, d, device, loss_fn, autocast)
        row.update(val)
        row["train_traces_per_s"] = n_tot / max(train_s, 1e-9)
        row["epoch_s"] = time.perf_counter() - t0
        row["lr"] = opt.param_groups[0]["lr"]
        history.append(row)
        _epoch_line(cfg, d, row)
        if _best_index(cfg, history)[0] == len(history) - 1:
            # the selected weights' validation predictions, kept for the test's threshold: reading the
            # validation split again with the same weights would give the same (and cost its bytes again)
            best_val = val_predictions
            if d.main:
                save_checkpoint(best_file, {"model": model.state_dict(), "epoch": epoch})
        checkpoint(epoch + 1, 0)
        if d.main:
            write_metrics(run_dir, history)

    test: dict[str, Any] = {}
    if history and not stopped_early and test_loader is not None:
        # the test split, scored once with the best epoch's weights; the threshold comes from validation
        d.barrier()
        if best_file.is_file():
            model.load_state_dict(load_checkpoint(best_file)["model"])
        # the best epoch's predictions, or (when it ran before a resume) the validation split predicted again
        yv, pv = best_val if best_val is not None else _predict(model, val_loader, cfg, d, device, autocast)
        yt, pt = _predict(model, test_loader, cfg, d, device, autocast)
        test = _test_metrics(cfg, yv, pv, yt, pt)
    summary = _summary(cfg, history, split, d, time.perf_counter() - t_start, n_train_total, n_val_total,
                       stopped_early, graph_layer, test=test, early_stopped=early_stopped, balance=balance)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if history:
            # once per run, not per epoch: a matplotlib figure costs about as much as an epoch of a small probe
            plot_curves(run_dir, history, cfg.task)
        atomic_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=json_default))
    d.barrier()
    return summary


def _join(ddp_model: nn.Module, d: _Dist) -> contextlib.AbstractContextManager[Any]:
    if not d.enabled:
        return contextlib.nullcontext()
    from torch.distributed.algorithms.join import Join

    return Join([ddp_model])  # type: ignore[list-item]


def _bar(cfg: TrainConfig, d: _Dist, epoch: int, total: int) -> Any:
    """A tqdm bar per epoch on a terminal; elsewhere (a log, CI) nothing per batch, and `_epoch_line` writes
    one line per epoch (tracestore.progress)."""
    if not (cfg.progress and d.main):
        return None
    from ..progress import bar

    return bar(total, f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", "batch", leave=False)


def _epoch_line(cfg: TrainConfig, d: _Dist, row: dict[str, Any]) -> None:
    """Off a terminal, one line per epoch: what a bar would have shown, and the validation figures."""
    from ..progress import is_terminal

    if not (cfg.progress and d.main) or is_terminal():
        return
    figures = ", ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss", "val_auroc", "val_mse")
                        if isinstance(row.get(k), float))
    print(f"{cfg.model} epoch {int(row['epoch']) + 1}/{cfg.epochs}: {figures} ({row['epoch_s']:.1f} s, "
          f"{row['train_traces_per_s']:.0f} traces/s)", file=sys.stderr, flush=True)


@torch.no_grad()
def _predict(model: nn.Module, loader: Any, cfg: TrainConfig, d: _Dist, device: torch.device,
             autocast: bool) -> tuple[np.ndarray, np.ndarray]:
    """Predict this rank's shard of `loader`, gather every rank's (id, target, prediction), de-duplicate by
    id (a loader may repeat traces to even out shards): targets and predictions of the whole split."""
    model.eval()
    ids: list[str] = []
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    loader.set_epoch(0)
    for batch in loader:
        y = _targets(batch.scores, cfg)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            # the bare module: no DDP forward sync needed for evaluation, and ranks may hold unequal batches
            out = model(_model_input(cfg.model, batch, device))
        ids.extend(str(i) for i in batch.ids)
        ys.append(y.float().cpu().numpy())
        ps.append(out.float().cpu().numpy())
    mine = (ids, np.concatenate(ys) if ys else np.zeros(0, np.float32), np.concatenate(ps) if ps else np.zeros(0, np.float32))
    parts = d.gather(mine)
    seen: dict[str, tuple[float, float]] = {}
    for pid, py, pp in parts:
        for i, yv, pv in zip(pid, py.tolist(), pp.tolist(), strict=True):
            seen.setdefault(i, (yv, pv))
    return (np.array([v[0] for v in seen.values()], np.float64), np.array([v[1] for v in seen.values()], np.float64))


def _evaluate(ddp_model: nn.Module, model: nn.Module, loader: Any, cfg: TrainConfig, d: _Dist, device: torch.device,
              loss_fn: nn.Module, autocast: bool) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """The validation row of an epoch (loss and metrics on the whole validation split), and the targets and
    predictions it came from."""
    y_all, p_all = _predict(model, loader, cfg, d, device, autocast)
    yt, pt = torch.from_numpy(y_all).float(), torch.from_numpy(p_all).float()
    buf = next(iter(loss_fn.buffers()), None)  # pos_weight lives on the training device
    if buf is not None:
        yt, pt = yt.to(buf.device), pt.to(buf.device)
    out_row: dict[str, float] = {"val_loss": float(loss_fn(pt, yt)) if y_all.size else float("nan")}
    if cfg.task == "classification":
        m = M.classification_metrics(y_all, p_all)
        out_row["val_auroc"], out_row["val_accuracy"] = m["auroc"], m["accuracy"]
    else:
        m = M.regression_metrics(y_all, p_all)
        out_row["val_mse"], out_row["val_pearson"] = m["mse"], m["pearson"]
    out_row["val_traces"] = float(y_all.size)
    return out_row, (y_all, p_all)


def _test_metrics(cfg: TrainConfig, y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray,
                  p_test: np.ndarray) -> dict[str, Any]:
    """Test figures of the selected weights. Classification: the threshold maximising Youden's J on the
    validation logits (probability 0.5, logit 0, when validation cannot rank: one class, NaN) applied to
    the test logits; `threshold` is reported as a probability."""
    if cfg.task == "regression":
        r = M.regression_metrics(y_test, p_test)
        return {"test_mse": r["mse"], "test_pearson": r["pearson"], "n_test": int(y_test.size)}
    t = M.youden_threshold(y_val, p_val)
    by = "youden_j_on_validation"
    if math.isnan(t):
        t, by = 0.0, "default_0.5 (validation cannot rank: one class, or NaN predictions)"
    out: dict[str, Any] = {"test_auroc": M.auroc(y_test, p_test)}
    out.update({f"test_{k}": v for k, v in M.thresholded_metrics(y_test, p_test, t).items()})
    out["threshold"] = float(1.0 / (1.0 + math.exp(-t))) if math.isfinite(t) else float(t > 0)
    out["threshold_logit"] = t
    out["threshold_by"] = by
    out["n_test"] = int(y_test.size)
    return out


def _best_index(cfg: TrainConfig, history: list[dict[str, Any]]) -> tuple[int | None, str | None]:
    """The best epoch's index in `history` and the figure it was chosen by: highest validation AUROC
    (classification) or lowest MSE (regression); validation loss where that metric is NaN in every epoch;
    (None, None) when every figure is NaN. A NaN epoch (diverged, or an undefined metric) is never the best."""
    if not history:
        return None, None
    crit, sign = ("val_auroc", -1.0) if cfg.task == "classification" else ("val_mse", 1.0)
    vals = [r[crit] for r in history]
    if all(math.isnan(v) for v in vals):
        crit, sign, vals = "val_loss", 1.0, [r["val_loss"] for r in history]
    if all(math.isnan(v) for v in vals):
        return None, None
    return int(np.nanargmin([sign * v for v in vals])), crit


def _patience_spent(cfg: TrainConfig, history: list[dict[str, Any]]) -> bool:
    """Whether `patience` epochs have passed since the best one (early stopping; never with patience 0)."""
    if not cfg.patience or not history:
        return False
    best, _ = _best_index(cfg, history)
    since = len(history) if best is None else len(history) - 1 - best
    return since >= cfg.patience


def store_split(store: Any, *, task: str, threshold: float, positive_below: float | None, val_fraction: float,
                test_fraction: float, seed: int, group_pattern: str | None,
                group_field: str | None) -> tuple[Split, np.ndarray | None]:
    """The train/validation/test split of a store and its 0/1 labels (-1 where the score is NaN; None for a
    regression), as `tracestore train` and `tracestore probe` both draw it: the same store, rule and seed give
    the same split."""
    scores = store.scores
    labels = None
    if task == "classification":
        lab = scores < positive_below if positive_below is not None else scores >= threshold
        labels = np.where(np.isnan(scores), -1, lab).astype(np.int64)
    groups = None
    if group_field is not None:
        if group_field not in store.fields:
            raise TrainConfigError(f"{store.url}: --group-field {group_field!r} is not a field of this store; its "
                                   f"fields are {sorted(store.fields) or 'none'} (or group by id with --group-pattern)")
        groups = store.fields[group_field]
    split = make_split(store.ids, scores, val_fraction=val_fraction, seed=seed, labels=labels,
                       group_pattern=group_pattern, groups=groups, group_field=group_field,
                       test_fraction=test_fraction)
    return split, labels


def label_rule_text(threshold: float, positive_below: float | None) -> str:
    """The classification label in words: 'score >= 0.5' or 'score < 0.5'."""
    return f"score < {positive_below:g}" if positive_below is not None else f"score >= {threshold:g}"


def check_label_rule(store: Any, task: str, positive_below: float | None) -> None:
    """Refuse a label rule that cannot mean what it says (train and probe): --positive-below on scores that are
    already the seed's 0/1 labels (it would invert them), or with a regression."""
    n_labels = int((store.attrs.get("provenance") or {}).get("label_scores") or 0)
    if task == "classification" and positive_below is not None and n_labels:
        raise TrainConfigError(
            f"{store.url}: {n_labels} of its scores are the archives' 0/1 labels (the seed's .pt files: 1 = "
            f"hallucination), not BLEURT scores; --positive-below {positive_below:g} would invert them. Use "
            f"the default --threshold 0.5 (label 1 = score >= 0.5), or convert with --scores "
            f"ground_truth_scores.csv to use the BLEURT scores")
    if task == "regression" and positive_below is not None:
        raise TrainConfigError("--positive-below sets classification labels; --task regression predicts the score "
                               "itself: leave one of them out")


def _one_class_sides(labels: np.ndarray, ids: np.ndarray, split: Split) -> list[str]:
    """Notes for the sides of the split whose labels are all one class (AUROC undefined there)."""
    lab = dict(zip(np.asarray(ids).astype(str).tolist(), np.asarray(labels).tolist(), strict=True))
    out = []
    for side, side_ids in (("train", split.train_ids), ("validation", split.val_ids), ("test", split.test_ids)):
        y = [lab[i] for i in side_ids if lab.get(i, -1) >= 0]  # -1: no score
        if y and len(set(y)) == 1:
            out.append(f"{side} split holds one class only ({len(y)} traces, all label {int(y[0])}); its AUROC "
                       f"is undefined (NaN)")
    return out


def _balance(cfg: TrainConfig, labels: np.ndarray | None, ids: np.ndarray, split: Split) -> dict[str, Any]:
    """The positive-class weight of the loss (n_negative / n_positive of the training split) and why: with
    balance="auto" only when the training labels are skewed beyond BALANCE_RATIO : 1."""
    out: dict[str, Any] = {"mode": cfg.balance, "pos_weight": None, "note": None}
    if cfg.task != "classification" or labels is None or cfg.balance == "none":
        return out
    lab = dict(zip(np.asarray(ids).astype(str).tolist(), labels.tolist(), strict=True))
    y = np.array([lab[i] for i in split.train_ids], np.float64)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    out.update(n_pos=n_pos, n_neg=n_neg)
    if n_pos == 0 or n_neg == 0:
        return out
    ratio = max(n_pos, n_neg) / min(n_pos, n_neg)
    if cfg.balance == "auto" and ratio <= BALANCE_RATIO:
        return out
    out["pos_weight"] = n_neg / n_pos
    why = f"labels skewed {ratio:.1f}:1 (beyond {BALANCE_RATIO:g}:1)" if cfg.balance == "auto" else "--balance weight"
    out["note"] = (f"{why}: {n_pos} positive, {n_neg} negative training traces; the loss weighs the positive "
                   f"class by {out['pos_weight']:.3f} (--balance none turns this off)")
    return out


def _partial(cfg: TrainConfig, run_dir: Path, epoch: int, rank: int, loss_sum: float, seen: int,
             seen_ids: list[str]) -> dict[str, Any]:
    """This rank's share of an epoch so far, for a mid-epoch checkpoint; with record_ids its ids file is written
    first, so that the file always holds at least the ids the checkpoint counts."""
    if cfg.record_ids:
        _write_ids(run_dir, epoch, rank, seen_ids)
    return {"loss_sum": loss_sum, "seen": seen, "ids_seen": len(seen_ids)}


def _ids_file(run_dir: Path, epoch: int, rank: int) -> Path:
    return run_dir / "ids" / f"epoch{epoch:03d}.rank{rank}.txt"


def _write_ids(run_dir: Path, epoch: int, rank: int, ids: list[str]) -> None:
    """RUN_DIR/ids/epochNNN.rankR.txt: the ids rank R trained on in epoch NNN, in order, one a line."""
    path = _ids_file(run_dir, epoch, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, "".join(f"{i}\n" for i in ids))


def _read_ids(run_dir: Path, epoch: int, rank: int, count: int) -> list[str]:
    """The first `count` ids of an epoch's ids file (what the checkpoint being resumed had counted)."""
    path = _ids_file(run_dir, epoch, rank)
    ids = path.read_text().splitlines()[:count] if path.is_file() else []
    if len(ids) != count:
        raise CheckpointError(f"{path}: holds {len(ids)} ids, the checkpoint counts {count} trained in epoch {epoch} "
                              f"on rank {rank}; the --record-ids audit of this run is incomplete. Resume without "
                              f"--record-ids, or start a new --out")
    return ids


def _summary(cfg: TrainConfig, history: list[dict[str, Any]], split: Split, d: _Dist, wall: float, n_train: int,
             n_val: int, stopped_early: bool, graph_layer: int, *, test: dict[str, Any] | None = None,
             early_stopped: bool = False, balance: dict[str, Any] | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"model": cfg.model, "task": cfg.task, "store": cfg.store, "run_dir": str(cfg.out),
                         "epochs_done": len(history), "epochs": cfg.epochs, "stopped_early": stopped_early,
                         "early_stopped": early_stopped, "patience": cfg.patience,
                         "n_train": n_train, "n_val": n_val, "n_test": len(split.test_ids),
                         "n_unscored": len(split.unscored_ids),
                         "label_rule": cfg.label_rule if cfg.task == "classification" else None,
                         "world_size": d.world_size, "distributed": d.enabled, "wall_s": wall,
                         "config": cfg.as_dict()}
    if cfg.model == "gnn":
        s["graph_layer"] = graph_layer
    s["weight_decay"], s["dropout"] = cfg.the_weight_decay, cfg.the_dropout  # as used (the model's defaults where not given)
    if balance is not None and cfg.task == "classification":
        s["balance"] = balance
    if cfg.bf16 and not cfg.device.startswith("cuda"):
        s["note"] = "bf16 autocast applies on CUDA only; this CPU run used float32"
    if not history:
        return s
    last = history[-1]
    keys = ("val_auroc", "val_accuracy") if cfg.task == "classification" else ("val_mse", "val_pearson")
    for k in (*keys, "val_loss", "train_loss"):
        s[k] = last[k]
    s["traces_per_s"] = float(np.mean([r["train_traces_per_s"] for r in history]))
    best, crit = _best_index(cfg, history)
    if best is None:
        s["best_epoch"] = s["best_by"] = None  # nothing to prefer any epoch by
    else:
        s["best_epoch"] = history[best]["epoch"]
        s["best_by"] = crit
        for k in (*keys, "val_loss"):
            s[f"best_{k}"] = history[best][k]
    if test:
        s.update(test)
        s["test_from_epoch"] = s["best_epoch"] if s["best_epoch"] is not None else last["epoch"]
    s["curves"] = str(Path(cfg.out) / "curves.png")
    s["metrics_csv"] = str(Path(cfg.out) / "metrics.csv")
    return s


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a dict (e.g. a checkpoint's `config`), ignoring unknown keys."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


def build_parser() -> Any:
    """The argument parser of `tracestore train` (also `python -m tracestore.train`, and under torchrun)."""
    import argparse

    p = argparse.ArgumentParser(prog="tracestore train", description="Train a probe (lstm, gnn, hybrid; seed-lstm, "
                                "seed-gnn-lstm: the seed pipeline's models) on a store's traces to predict their "
                                "score: selected on a validation split, scored on a held-out test split (70/15/15). "
                                "Run under `torchrun --nproc_per_node=N -m tracestore.train ...` for data-parallel "
                                "training.")
    p.add_argument("--store", required=True, help="store URL or path")
    p.add_argument("--model", choices=MODEL_NAMES, default="lstm")
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--epochs", type=int, default=50, help="most epochs (default 50; see --patience)")
    p.add_argument("--patience", type=int, default=5, help="stop after N epochs without a better validation "
                   "AUROC (MSE for regression); 0: train all --epochs (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay; default: the model's own "
                   "(lstm 1.0, others 0.01)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of validation (default 0.15)")
    p.add_argument("--test-fraction", type=float, default=0.15, help="share of the held-out test split (default "
                   "0.15: the seed's 70/15/15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=None, help="seed of the split (default: --seed)")
    p.add_argument("--seeds", type=int, default=1, metavar="K", help="repeat with K seeds on one split; report "
                   "mean and std of the test metrics (RUN_DIR/seedN/, RUN_DIR/summary.json)")
    p.add_argument("--balance", choices=BALANCE, default="auto", help="weigh the positive class in the loss by "
                   "n_neg/n_pos: auto (default) when labels are skewed beyond 2:1, weight always, none never")
    p.add_argument("--group-field", default=None, help="a store field (e.g. question_id) whose value names a "
                   "trace's group; a group's traces stay on one side of the split")
    p.add_argument("--group-pattern", default=None, help="regex whose first group names an id's group; a group's "
                   "traces stay on one side of the split (e.g. '^(q\\d+)_' for several answers per prompt)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=None, help="default: the model's own (lstm 0.5, others 0.1; "
                   "the seed models keep the seed's)")
    p.add_argument("--graph-layer", type=int, default=None, help="layer the gnn reads (default: the middle one)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--threshold", type=float, default=0.5,
                        help="classification label 1 is score >= threshold (default 0.5)")
    labels.add_argument("--positive-below", type=float, default=None, metavar="T",
                        help="classification label 1 is score < T instead: the seed pipeline's rule, "
                             "hallucination = BLEURT score < 0.5 (--positive-below 0.5)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (single process)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (resume continues)")
    p.add_argument("--record-ids", action="store_true", help="write the ids each rank trained on to RUN_DIR/ids/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """`tracestore train ...`: parse, train, print the summary's headline. Returns 0 on success, 2 on a
    tracestore error (one line on stderr naming the problem and the fix)."""
    import sys

    from ..errors import TracestoreError

    args = build_parser().parse_args(argv)
    kw = vars(args)
    kw["progress"] = not kw.pop("no_progress")
    cfg = TrainConfig(**kw)
    try:
        summary = train(cfg)
    except TracestoreError as e:
        print(f"tracestore train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        if cfg.seeds > 1:
            keys = [k for k in ("test_auroc", "test_accuracy", "test_mse", "test_pearson") if f"{k}_mean" in summary]
            head = ", ".join(f"{k}={summary[k + '_mean']:.4f} ± {summary[k + '_std']:.4f}" for k in keys)
            print(f"{cfg.model} {cfg.task}: {cfg.seeds} seeds, {head}; {summary['wall_s']:.1f}s -> {cfg.out}")
            return 0
        keys = [k for k in ("val_auroc", "val_accuracy", "val_mse", "val_pearson", "test_auroc", "test_accuracy",
                            "threshold", "test_mse", "test_pearson") if k in summary]
        head = ", ".join(f"{k}={summary[k]:.4f}" for k in keys)
        stop = " (early stop)" if summary.get("early_stopped") else ""
        print(f"{cfg.model} {cfg.task}: {summary['epochs_done']} epochs{stop}, {head}; {summary['wall_s']:.1f}s -> "
              f"{cfg.out}")
    return 0
