"""The one training loop of kdcli: :func:`fit`, used by ``kdcli train`` and
``kdcli train-student``.

The data is held as tensors (or memory-mapped rows) and batched by index from a seeded
permutation, so the same seed gives bit-identical weights on the same CPU and thread count.
:func:`fit` runs the epochs; :class:`_Run` holds what they train with and does one epoch,
one step, the roll-back of an epoch whose loss blew up and the test errors. A checkpoint
(:mod:`kdcli.training.checkpoint`) written after each reported epoch lets an interrupted run
resume exactly.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdcli.checks import resolve_device
from kdcli.config import TrainConfig
from kdcli.data.augment import AugmentConfig
from kdcli.devices import host_to_device, use_tf32
from kdcli.distributed import Dist
from kdcli.errors import ModelError, UsageError
from kdcli.evaluate import predict
from kdcli.output import Reporter
from kdcli.students.base import Architecture, apply_max_norm
from kdcli.training.checkpoint import load_checkpoint, save_checkpoint
from kdcli.transfer.rows import Rows

if TYPE_CHECKING:
    from kdcli.data.base import Data


# Runs of more epochs than this evaluate, print and checkpoint every epochs // REPORTS.
REPORTS = 50

# How often fit() halves the learning rate and retries an epoch whose loss blew up.
MAX_LR_HALVINGS = 4
# An epoch whose mean loss is over this many times the epoch before's has blown up.
BLOWUP_FACTOR = 3.0
# ... and is above this: a loss near 0 that triples (0.001 -> 0.004) is noise, not a blow-up.
BLOWUP_FLOOR = 1.0

# ``(logits [B, C] float32, index [B]) -> (loss, statistics [K])``: see :func:`fit`.
StepLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def fit(model: nn.Module, arch: Architecture, inputs: torch.Tensor | Rows, step_loss: StepLoss,
        stat_names: list[str], cfg: TrainConfig, *, eval_data: Data | None,
        checkpoint: Path | None, fingerprint: dict[str, Any], resume: bool,
        reporter: Reporter, dist: Dist | None = None,
        augment: AugmentConfig | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place: the one training loop of kdcli.

    Under torchrun (``dist`` enabled) the model is wrapped in DistributedDataParallel and
    every rank draws the same permutation; each step's global batch is split into
    contiguous per-rank slices, and each rank's loss is weighted by its share, so the
    averaged gradient is the global batch's mean: the same update as one process makes.

    Args:
        model: Maps raw input batches ``[B, ...]`` to logits ``[B, C]``.
        arch: Its architecture (for the max-norm constraint).
        inputs: All training inputs ``[N, ...]``: a tensor, or memory-mapped :class:`Rows`.
        step_loss: ``(logits [B, C] float32, index [B]) -> (loss, stats [K])``, where
            ``index`` selects the batch's rows of the training set.
        stat_names: Names of the ``K`` per-batch statistics (batch means).
        cfg: Optimization settings.
        eval_data: Labelled data for test errors after each epoch, or None.
        checkpoint: Where to write a checkpoint after each epoch (None: nowhere).
        fingerprint: Everything that must match for ``resume`` to be allowed.
        resume: Continue from ``checkpoint``.
        reporter: Output sink.
        dist: This process's place in a torchrun job (default: a single process).
        augment: Augmentation of each training batch (``kdcli train``; default none).

    Returns:
        One record per epoch: the statistics' epoch means, test errors, seconds.
    """
    run = _Run.setup(model, arch, cfg, int(inputs.shape[0]), dist or Dist(),
                     augment or AugmentConfig())
    cfg, history, start_epoch = run.cfg, [], 0
    if resume:
        start_epoch, history = load_checkpoint(checkpoint, fingerprint, model, run.opt,
                                                run.gen, cfg.epochs)
        reporter.info(f"resuming from {checkpoint} after epoch {start_epoch}")
    run.wrap(start_epoch)
    # Long runs on small sets evaluate, print and checkpoint about REPORTS times in all.
    every = max(1, cfg.epochs // REPORTS)
    # A loss that blows up rolls the epoch back and retries it at half the learning rate
    # (the rest of the run keeps the lower rate); after MAX_LR_HALVINGS it is an error.
    lr_scale = history[-1].get("lr_scale", 1.0) if history else 1.0
    with reporter.progress("training", (cfg.epochs - start_epoch) * run.n) as advance:
        epoch, shown_header = start_epoch, None
        while epoch < cfg.epochs:
            snapshot = _snapshot(model, run.opt, run.gen)
            t0 = time.perf_counter()
            sums, seen, clipped = run.train_epoch(inputs, step_loss, len(stat_names), epoch,
                                                  lr_scale, advance)
            if _blew_up(float(sums[0] / max(seen, 1)), run.first_loss, history):
                try:
                    lr_scale = run.roll_back(snapshot, epoch, sums, seen, lr_scale, reporter)
                except UsageError:  # diverged: its checkpoint would only diverge again;
                    # one this run resumed from holds earlier good epochs, and is kept
                    if checkpoint is not None and run.dist.main and start_epoch == 0:
                        checkpoint.unlink(missing_ok=True)
                    raise
                continue
            record = _record(epoch, stat_names, sums, seen, lr_scale, clipped, run.steps)
            shown = (epoch + 1) % every == 0 or epoch + 1 in (cfg.epochs, cfg.stop_after)
            if eval_data is not None and run.dist.main and (shown or cfg.dry_run):
                record["test_errors"], _ = run.test_errors(eval_data)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(record)
            if shown or cfg.dry_run:
                shown_header = _show_epoch(record, cfg.epochs, shown_header, reporter)
            if cfg.dry_run:
                break
            if checkpoint is not None and run.dist.main and shown:
                save_checkpoint(checkpoint, fingerprint, epoch + 1, history, model, run.opt,
                                 run.gen)
            if cfg.stop_after and epoch + 1 >= cfg.stop_after and epoch + 1 < cfg.epochs:
                reporter.info(f"stopped after epoch {epoch + 1} of {cfg.epochs}; continue with "
                              "--resume")
                break
            epoch += 1
    if history and run.dist.main and not cfg.dry_run and history[-1]["epoch"] >= cfg.epochs:
        _warn_if_failed(history, _final_stats(run, inputs, step_loss, stat_names), eval_data,
                        cfg, reporter)
    run.close()
    return history


@dataclass
class _Run:
    """What one :func:`fit` call trains with: the model (and its DDP wrapper), optimizer,
    generator and step arithmetic. Its methods are the parts of the loop."""

    model: nn.Module
    net: nn.Module
    arch: Architecture
    cfg: TrainConfig  # with epochs resolved
    dist: Dist
    aug: AugmentConfig
    dev: torch.device
    n: int  # training examples
    bs: int  # global batch size
    steps: int  # per epoch
    gen: torch.Generator  # draws the permutations and augmentations
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    first_loss: float | None = None  # the untrained model's loss on the first batch

    @classmethod
    def setup(cls, model: nn.Module, arch: Architecture, cfg: TrainConfig, n: int, dist: Dist,
              aug: AugmentConfig) -> _Run:
        """Move ``model`` to the device and build the optimizer."""
        dev = torch.device(resolve_device(cfg.device))
        model.to(dev)
        if dev.type == "cuda":
            use_tf32()
        cfg = cfg.resolved(n)
        bs = min(cfg.batch_size, n)
        if bs < dist.world:
            raise UsageError(f"--batch-size {bs} is smaller than the {dist.world} ranks",
                             f"Use --batch-size of at least {dist.world}")
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return cls(model, model, arch, cfg, dist, aug, dev, n, bs, math.ceil(n / bs), gen,
                   params, opt)

    def wrap(self, start_epoch: int) -> None:
        """Under torchrun: wrap the model in DistributedDataParallel."""
        if not self.dist.enabled:
            return
        self.net = DistributedDataParallel(self.model, device_ids=[self.dist.local_rank]
                                           if self.dev.type == "cuda" else None)
        if self.dist.rank:  # distinct dropout masks on each rank
            torch.manual_seed(self.cfg.seed + 7919 * self.dist.rank + start_epoch)

    def train_epoch(self, inputs: torch.Tensor | Rows, step_loss: StepLoss, n_stats: int,
                    epoch: int, lr_scale: float,
                    advance: Callable[[int], None]) -> tuple[torch.Tensor, int, int]:
        """Train one epoch (one batch with ``dry_run``); return the statistics' sums over the
        global batch, the examples seen and the steps clipped."""
        cfg, dist, aug, bs, steps = self.cfg, self.dist, self.aug, self.bs, self.steps
        self.model.train()
        perm = torch.randperm(self.n, generator=self.gen)
        # Summed on the device, read once an epoch: a read per step would wait for the GPU.
        sums = torch.zeros(n_stats, dtype=torch.float64, device=self.dev)
        clipped = torch.zeros((), dtype=torch.int64, device=self.dev)
        seen = 0
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            for group in self.opt.param_groups:
                group["lr"] = lr_scale * learning_rate(
                    cfg, epoch * steps + s, cfg.epochs * steps, round(cfg.warmup * steps))
            if aug.active:  # drawn for the global batch, so every rank agrees
                draw = aug.draw(len(idx), self.gen)
            lo, hi = dist.split(len(idx))
            local = idx[lo:hi]
            x = inputs[local]
            if aug.active:
                x = aug.apply(x, draw[lo:hi])
            stats, norm = self._step(x, local, len(idx), step_loss, n_stats)
            if norm is not None:
                clipped += norm > cfg.grad_clip
            sums += stats.detach().to(self.dev, torch.float64) * len(local)
            if self.first_loss is None and len(local):
                self.first_loss = float(stats[0])
            seen += len(local)
            advance(len(idx))
            if cfg.dry_run:
                break
        sums, clipped = sums.cpu(), int(clipped)
        if dist.enabled:  # every rank must take the same decisions: share the numbers
            extra = torch.tensor([float(seen), self.first_loss or 0.0], dtype=torch.float64)
            totals = dist.all_reduce_sum(torch.cat([sums, extra]))
            sums, seen = totals[:-2], int(totals[-2])
            self.first_loss = float(totals[-1]) / dist.world
        return sums, seen, clipped

    def _step(self, x: torch.Tensor, local: torch.Tensor, global_batch: int,
              step_loss: StepLoss, n_stats: int):
        """One optimizer step on this rank's rows ``local``; return the statistics and the
        gradient norm before clipping (None without clipping)."""
        cfg, dist = self.cfg, self.dist
        with torch.autocast(self.dev.type, dtype=torch.bfloat16,
                            enabled=cfg.precision == "bf16"):
            z = self.net(host_to_device(x, self.dev))
        if len(local):
            loss, stats = step_loss(z.float(), local)
            if dist.enabled:  # DDP averages over ranks: weight by this rank's share
                loss = loss * (len(local) * dist.world / global_batch)
        else:  # a last batch smaller than the world: take part with no rows
            loss, stats = z.sum() * 0.0, torch.zeros(n_stats)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = None
        if cfg.grad_clip:  # after DDP's all-reduce, so every rank clips alike
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        if self.arch.max_norm:
            apply_max_norm(self.model, self.arch.max_norm)
        return stats, norm

    def roll_back(self, snapshot: tuple, epoch: int, sums: torch.Tensor, seen: int,
                  lr_scale: float, reporter: Reporter) -> float:
        """After an epoch whose loss blew up: undo it and return the halved ``lr_scale``.

        Raises:
            ModelError: the loss is not finite while the weights stayed modest (the data).
            UsageError: the learning rate was already halved MAX_LR_HALVINGS times.
        """
        cfg, loss = self.cfg, float(sums[0] / max(seen, 1))
        if not math.isfinite(float(sums[0])):
            _check_not_data(self.model, epoch)
        if lr_scale <= 0.5 ** MAX_LR_HALVINGS:
            raise UsageError(
                f"training diverged in epoch {epoch + 1} (the loss {_loss_text(loss)}) even "
                f"at --lr {cfg.lr * lr_scale:g}",
                f"Lower --lr well below that, e.g. --lr {cfg.lr * lr_scale / 4:g}")
        _restore(snapshot, self.model, self.opt, self.gen)
        reporter.warn(f"the loss {_loss_text(loss)} in epoch {epoch + 1} at --lr "
                      f"{cfg.lr * lr_scale:g}; retrying the epoch at half the learning rate")
        return lr_scale / 2

    def test_errors(self, eval_data: Data) -> tuple[int, int]:
        """Test errors on ``eval_data``, and the model's class count."""
        self.model.eval()
        with torch.autocast(self.dev.type, dtype=torch.bfloat16,
                            enabled=self.cfg.precision == "bf16"):
            logits = predict(lambda xb: self.model(xb.to(self.dev)), eval_data.inputs)
        return int((logits.argmax(-1) != eval_data.labels).sum()), logits.shape[-1]

    def close(self) -> None:
        """Free DDP's reducer (before the process group is destroyed); the model to CPU."""
        if self.dist.enabled:
            self.net = self.model
            gc.collect()
        self.model.cpu().eval()


def _record(epoch: int, stat_names: list[str], sums: torch.Tensor, seen: int, lr_scale: float,
            clipped: int, steps: int) -> dict[str, Any]:
    """An epoch's history record: the statistics' means, the lr scale, the clipped share."""
    record = {"epoch": epoch + 1, **{k: float(v / seen)
                                     for k, v in zip(stat_names, sums, strict=True)}}
    if lr_scale != 1.0:
        record["lr_scale"] = lr_scale
    if clipped:
        record["clipped"] = round(clipped / steps, 4)  # share of steps clipped
    return record


def _blew_up(loss: float, first_loss: float | None, history: list[dict[str, Any]]) -> bool:
    """Whether an epoch's mean loss blew up: not finite, or over BLOWUP_FACTOR times the epoch
    before's (for the first epoch, the untrained model's loss on its first batch). A healthy
    run's epoch means fall, and the first one stays below the untrained model's loss."""
    if not math.isfinite(loss):
        return True
    ref = history[-1].get("train_loss") if history else first_loss
    return (ref is not None and math.isfinite(ref) and loss > BLOWUP_FACTOR * ref
            and loss > BLOWUP_FLOOR)


def _loss_text(loss: float) -> str:
    return "is not finite" if not math.isfinite(loss) else f"rose to {loss:.4g}"


def _snapshot(model, opt, gen) -> tuple:
    """Everything an epoch changes, to roll it back if its loss blows up."""
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            gen.get_state(), torch.get_rng_state())


def _restore(snapshot: tuple, model, opt, gen) -> None:
    model.load_state_dict(snapshot[0])
    opt.load_state_dict(snapshot[1])
    gen.set_state(snapshot[2])
    torch.set_rng_state(snapshot[3])


def _check_not_data(model: nn.Module, epoch: int) -> None:
    """For a non-finite loss: raise ModelError when the weights stayed finite and modest,
    which points at the data (NaN inputs, impossible targets), not at the step size."""
    if all(bool(torch.isfinite(p).all()) and float(p.abs().max()) < 1e4
           for p in model.parameters() if p.numel()):
        raise ModelError(f"the loss became NaN or Inf in epoch {epoch + 1} while the weights "
                         "stayed finite: the inputs or targets hold values the loss cannot "
                         "take", "Check the data and transfer set (kdcli inspect --verify)")


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total_steps``.

    A linear warmup to ``cfg.lr`` over the first ``warmup_steps`` steps, then ``cfg.lr``
    (constant) or a half-cosine from ``cfg.lr`` to 0 over the remaining steps (cosine).
    """
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


# A run "ends at chance" when its accuracy (test, else on training rows; a student's: its
# agreement with the teacher) is below 2/C for C > 2 classes, or below 55% for 2; its loss is
# "absurd" when the cross-entropy on hard labels exceeds 100 log C on training rows (a
# uniform guess scores log C; 100 times that is a model confidently wrong by ~100s of nats).
CHANCE_BINARY, ABSURD_LOSS = 0.55, 100.0
_FINAL_ROWS = 4096  # training rows the final model is checked on


def _final_stats(run: _Run, inputs: torch.Tensor | Rows, step_loss: StepLoss,
                 stat_names: list[str]) -> dict[str, float]:
    """The final model's statistics (as ``stat_names``) on up to :data:`_FINAL_ROWS`
    training rows spread over the set, and its class count as ``classes``."""
    idx = torch.linspace(0, run.n - 1, min(run.n, _FINAL_ROWS)).long().unique()
    run.model.eval()
    with torch.no_grad():
        z = torch.cat([run.model(inputs[idx[a:a + 512]].to(run.dev)).float()
                       for a in range(0, len(idx), 512)])
        _, stats = step_loss(z, idx)
    return {**dict(zip(stat_names, stats.tolist(), strict=True)), "classes": z.shape[-1]}


def _warn_if_failed(history: list[dict[str, Any]], final: dict[str, float],
                    eval_data: Data | None, cfg: TrainConfig, reporter: Reporter) -> None:
    """Warn when training ends at chance or with an absurd loss (the rules above): a loss
    that blew up but stayed finite (so no divergence error), or inputs of an absurd scale,
    leave a model that predicts one class, or predicts wildly, for everything."""
    c = int(final["classes"])
    lr = cfg.lr * history[-1].get("lr_scale", 1.0)  # the rate the run ended at
    # the cross-entropy on hard labels: train's loss, a student's hard term (0 without labels)
    loss = final["hard"] if "hard" in final else final.get("train_loss", 0.0)
    absurd = c > 1 and not loss <= ABSURD_LOSS * math.log(c)
    if absurd:
        shown = f"{loss:.3g}" if math.isfinite(loss) else "not finite"
        reporter.warn(f"training ended with an absurd loss ({shown} on training rows; over "
                      f"{ABSURD_LOSS:g} log C = {ABSURD_LOSS * math.log(c):.3g} counts as "
                      "absurd): the model is confidently wrong. Check the inputs' scale "
                      f"(--normalize) and lower --lr {lr:g}")
    if "test_errors" in history[-1] and eval_data is not None:
        accuracy, where = 1 - history[-1]["test_errors"] / len(eval_data.labels), "test"
    elif "train_error" in final:
        accuracy, where = 1 - final["train_error"], "training"
    elif "agreement" in final:
        accuracy, where = final["agreement"], "teacher-agreement"
    else:
        return
    bar = 2 / c if c > 2 else CHANCE_BINARY
    if c > 1 and accuracy < bar:
        why = (f"training failed, most likely because --lr {lr:g} is too high for this loss. "
               f"Try --lr {lr / 2:g}") if absurd or history[-1].get("lr_scale", 1.0) < 1 \
            else "the model learnt little: train longer (--epochs), or check the labels"
        reporter.warn(f"{where} accuracy {accuracy:.1%} is near chance ({1 / c:.1%}; below "
                      f"{bar:.0%} counts as chance): {why}")


#: How an epoch line heads its statistics (the history's own names stay as they are).
EPOCH_LABELS = {"train_loss": "loss", "train_error": "error", "agreement": "agree",
                "lr_scale": "lr", "test_errors": "test errors", "seconds": "time"}


def _show_epoch(r: dict[str, Any], epochs: int, shown_header: str | None,
                reporter: Reporter) -> str:
    """Print an epoch's line, under its header unless the last line had the same one (it
    changes when a column comes: the lr after a halving, the clipped share).

    Returns:
        The header now above the lines.
    """
    header, line = _epoch_line(r, epochs)
    if header != shown_header:
        reporter.info(header)
    reporter.info(line)
    return header


def _epoch_line(r: dict[str, Any], epochs: int) -> tuple[str, str]:
    """An epoch's progress line and the header above it, aligned in columns that fit in 80
    characters (a terminal's and a pipe's width) whatever the statistics.

    Args:
        r: The epoch's history record.
        epochs: The run's epochs.

    Returns:
        The header and the line.
    """
    cells = [("epoch", f"{r['epoch']}/{epochs}".rjust(2 * len(str(epochs)) + 1))]
    for k, v in r.items():
        if k in ("epoch", "seconds"):
            continue
        if k == "lr_scale":
            value = f"{v:.3g}"
        elif k == "clipped":
            value = f"{100 * v:.0f}%"
        else:
            value = f"{v}" if isinstance(v, int) else f"{v:.4f}"
        cells.append((EPOCH_LABELS.get(k, k), value))
    cells.append(("time", f"{r['seconds']:.1f}s"))
    # widths from the labels alone, so the header changes only when a column comes
    widths = [len(cells[0][1]), *(max(len(label), 6) for label, _ in cells[1:])]
    gap = "  " if sum(widths) + 2 * (len(cells) - 1) <= 80 else " "
    header = gap.join(label.ljust(w) if i == 0 else label.rjust(w)
                      for i, ((label, _), w) in enumerate(zip(cells, widths, strict=True)))
    line = gap.join(value.rjust(w) for (_, value), w in zip(cells, widths, strict=True))
    return header.rstrip(), line
