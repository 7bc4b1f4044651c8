"""``kdcli train`` (hard labels) and ``kdcli train-student`` (distillation).

Both share one visible training loop, :func:`fit`: the data is held as tensors and batched
by index from a seeded permutation, so the same seed gives bit-identical weights on the same
CPU and thread count, and a checkpoint written after each epoch lets an interrupted run
resume exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.config import (  # noqa: F401 - the constants are re-exported, as kdcli.train's API
    DEFAULT_EPOCHS,
    MAX_AUTO_EPOCHS,
    MIN_STEPS,
    STUDENT_GRAD_CLIP,
    STUDENT_LR,
    STUDENT_WARMUP,
    DistillConfig,
    TrainConfig,
    student_config,
)
from kdcli.data.augment import AugmentConfig
from kdcli.devices import host_to_device, use_tf32
from kdcli.distributed import Dist
from kdcli.errors import FormatError, OutputExistsError, UsageError, first_line
from kdcli.io.files import (
    atomic_output,
    check_output,
    check_writable,
    data_files,
    sha256_file,
)
from kdcli.modalities import fit_preprocessing
from kdcli.output import Reporter
from kdcli.preprocessing import Preprocessing
from kdcli.students.base import Architecture, apply_max_norm, build_model
from kdcli.students.model_file import save_model

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kdcli.data.base import Data, DataOptions
    from kdcli.transfer.base import Rows


# Runs of more epochs than this evaluate, print and checkpoint every epochs // REPORTS.
REPORTS = 50

# How often fit() halves the learning rate and retries an epoch whose loss blew up.
MAX_LR_HALVINGS = 4
# An epoch whose mean loss is over this many times the epoch before's has blown up.
BLOWUP_FACTOR = 3.0
# ... and is above this: a loss near 0 that triples (0.001 -> 0.004) is noise, not a blow-up.
BLOWUP_FLOOR = 1.0

StepLoss = Callable[["torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


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
        start_epoch, history = _load_checkpoint(checkpoint, fingerprint, model, run.opt,
                                                run.gen, cfg.epochs)
        reporter.info(f"resuming from {checkpoint} after epoch {start_epoch}")
    run.wrap(start_epoch)
    # Long runs on small sets evaluate, print and checkpoint about REPORTS times in all.
    every = max(1, cfg.epochs // REPORTS)
    # A loss that blows up rolls the epoch back and retries it at half the learning rate
    # (the rest of the run keeps the lower rate); after MAX_LR_HALVINGS it is an error.
    lr_scale = history[-1].get("lr_scale", 1.0) if history else 1.0
    with reporter.progress("training", (cfg.epochs - start_epoch) * run.n) as advance:
        epoch = start_epoch
        while epoch < cfg.epochs:
            snapshot = _snapshot(model, run.opt, run.gen)
            t0 = time.perf_counter()
            sums, seen, clipped = run.train_epoch(inputs, step_loss, len(stat_names), epoch,
                                                  lr_scale, advance)
            if _blew_up(float(sums[0] / max(seen, 1)), run.first_loss, history):
                lr_scale = run.roll_back(snapshot, epoch, sums, seen, lr_scale, reporter)
                continue
            record = _record(epoch, stat_names, sums, seen, lr_scale, clipped, run.steps)
            shown = (epoch + 1) % every == 0 or epoch + 1 in (cfg.epochs, cfg.stop_after)
            if eval_data is not None and run.dist.main and (shown or cfg.dry_run):
                record["test_errors"], _ = run.test_errors(eval_data)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(record)
            if shown or cfg.dry_run:
                reporter.info(_epoch_line(record, cfg.epochs))
            if cfg.dry_run:
                break
            if checkpoint is not None and run.dist.main and shown:
                _save_checkpoint(checkpoint, fingerprint, epoch + 1, history, model, run.opt,
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
        import torch

        from kdcli.checks import resolve_device

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
        import torch
        from torch.nn.parallel import DistributedDataParallel

        self.net = DistributedDataParallel(self.model, device_ids=[self.dist.local_rank]
                                           if self.dev.type == "cuda" else None)
        if self.dist.rank:  # distinct dropout masks on each rank
            torch.manual_seed(self.cfg.seed + 7919 * self.dist.rank + start_epoch)

    def train_epoch(self, inputs: torch.Tensor | Rows, step_loss: StepLoss, n_stats: int,
                    epoch: int, lr_scale: float,
                    advance: Callable[[int], None]) -> tuple[torch.Tensor, int, int]:
        """Train one epoch (one batch with ``dry_run``); return the statistics' sums over the
        global batch, the examples seen and the steps clipped."""
        import torch

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
        import torch

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
        import torch

        from kdcli.evaluate import predict

        self.model.eval()
        with torch.autocast(self.dev.type, dtype=torch.bfloat16,
                            enabled=self.cfg.precision == "bf16"):
            logits = predict(lambda xb: self.model(xb.to(self.dev)), eval_data.inputs)
        return int((logits.argmax(-1) != eval_data.labels).sum()), logits.shape[-1]

    def close(self) -> None:
        """Free DDP's reducer (before the process group is destroyed); the model to CPU."""
        if self.dist.enabled:
            import gc

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
    import torch

    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            gen.get_state(), torch.get_rng_state())


def _restore(snapshot: tuple, model, opt, gen) -> None:
    import torch

    model.load_state_dict(snapshot[0])
    opt.load_state_dict(snapshot[1])
    gen.set_state(snapshot[2])
    torch.set_rng_state(snapshot[3])


def _check_not_data(model: nn.Module, epoch: int) -> None:
    """For a non-finite loss: raise ModelError when the weights stayed finite and modest,
    which points at the data (NaN inputs, impossible targets), not at the step size."""
    import torch

    from kdcli.errors import ModelError

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
    import torch

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


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']:>3}/{epochs}"]
    for k, v in r.items():
        if k in ("epoch", "seconds"):
            continue
        parts.append(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}")
    parts.append(f"{r['seconds']:.1f}s")
    return "  ".join(parts)


def _save_checkpoint(path: Path, fingerprint: dict, epoch: int, history: list, model, opt,
                     gen) -> None:
    import torch

    state = {"fingerprint": json.dumps(fingerprint, sort_keys=True), "epoch": epoch,
             "history": json.dumps(history), "model": model.state_dict(),
             "optimizer": opt.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state()}
    with atomic_output(path, force=True) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path | None, fingerprint: dict, model, opt, gen, epochs: int):
    import pickle

    import torch

    if path is None or not path.exists():
        raise UsageError(f"--resume, but there is no checkpoint at {path}",
                         "Run without --resume to start afresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["fingerprint"])
        epoch = state["epoch"]
    except pickle.UnpicklingError as e:  # torch's restricted unpickler refused a global
        if not _pickle_like(path):  # random bytes, not a pickle of anything
            raise FormatError(f"checkpoint {path} is damaged: it is not a torch.save "
                              "archive", "Delete it and run without --resume") from None
        raise FormatError(f"checkpoint {path} is damaged: it holds pickled Python objects "
                          "that a kdcli checkpoint never has (nothing was run)",
                          "Delete it and run without --resume") from e
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint
        raise FormatError(f"checkpoint {path} is damaged ({type(e).__name__}: "
                          f"{first_line(e)[:120]})",
                          "Delete it and run without --resume") from None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= epochs:
        raise FormatError(f"checkpoint {path} records epoch {str(epoch)[:20]}, outside "
                          f"0..{epochs} (--epochs)", "Delete it and run without --resume")
    if saved != fingerprint:
        keys = sorted(k for k in set(saved) | set(fingerprint)
                      if saved.get(k) != fingerprint.get(k))
        raise UsageError(f"checkpoint {path} comes from a different configuration "
                         f"(differs in: {', '.join(keys)})",
                         "Rerun with the original options, or delete the checkpoint")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return epoch, json.loads(state["history"])


def _pickle_like(path: Path) -> bool:
    """Whether ``path`` starts as a zip archive (torch.save) or a pickle (its legacy format)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and head[1] <= 5)


def _normalize(cfg: TrainConfig, arch: Architecture) -> bool:
    """Resolve ``normalize=None`` (auto): normalize unless there is input dropout."""
    return cfg.normalize if cfg.normalize is not None else not arch.input_dropout


def checkpoint_path(out: str | Path) -> Path:
    """Where the per-epoch checkpoint of a run writing ``out`` lives."""
    return Path(f"{out}.ckpt")


def check_train_outputs(out: str | Path, force: bool, resume: bool,
                        inputs: list[str | Path] = ()) -> None:
    """Before training: the model and its checkpoint can be written, and a fresh run does
    not overwrite an earlier run's checkpoint without ``force``.

    Raises:
        OutputExistsError: ``out`` exists, or ``OUT.ckpt`` exists and neither ``resume``
            nor ``force`` is given.
        UsageError: ``out`` or ``OUT.ckpt`` is an input, or not a regular file.
        OutputWriteError: the folder is not writable.
    """
    inputs = [*inputs, *_transfer_files(inputs)]
    check_output(out, force, inputs)
    ckpt = check_output(checkpoint_path(out), force=True, inputs=inputs)
    if ckpt.exists() and not resume and not force:
        raise OutputExistsError(f"checkpoint {ckpt} of an earlier run exists",
                                "Pass --resume to continue that run, or --force to start "
                                "afresh (this discards it)")
    check_writable(ckpt.parent)


def _transfer_files(inputs) -> list[Path]:
    """The shards of any sharded transfer set among ``inputs``."""
    from kdcli.transfer.base import is_index_path, own_shards

    return [f for i in inputs if is_index_path(i) for f in own_shards(i)]



def _default_eval(eval_data: str | None, source: str) -> str | None:
    if eval_data == "auto":
        return "mnist:test" if source.split("[")[0] in ("mnist", "mnist:train") else None
    if eval_data in (None, "", "none"):
        return None
    return eval_data


@dataclass(frozen=True)
class _Outputs:
    """Where and how a trained model is written, and the title of its results table."""

    out: str | Path
    force: bool
    title: str
    start_time: float  # time.perf_counter() when the command started
    names: dict[str, list[str] | None]  # class_names and feature_names of the model file
    precision_note: str | None = None  # what --precision auto chose and why (the table)


def _finish(model: nn.Module, *, arch: Architecture, pre: Preprocessing, num_classes: int,
            training: dict[str, Any], history: list[dict[str, Any]], eval_ds: Data | None,
            cfg: TrainConfig, outputs: _Outputs, reporter: Reporter,
            dist: Dist) -> dict[str, Any]:
    """Final fp32 evaluation, model file, checkpoint clean-up and the results table (the
    model file and table on rank 0 only)."""
    from kdcli.evaluate import classification_metrics, predict
    from kdcli.students.base import count_params

    summary = dict(training)
    if dist.enabled:
        summary["ranks"] = dist.world
    if not dist.main:
        dist.barrier()
        return summary
    if eval_ds is not None:
        m = classification_metrics(predict(model, eval_ds.inputs), eval_ds.labels)
        summary.update(test_data=eval_ds.source, test_errors=m["errors"],
                       test_accuracy=m["accuracy"], test_nll=m["nll"])
    last = history[-1] if history else {}
    summary.update({k: v for k, v in last.items() if k not in ("epoch", "seconds",
                                                                 "test_errors")})
    summary["seconds"] = round(time.perf_counter() - outputs.start_time, 2)
    summary["params"] = count_params(model)
    summary["history"] = history
    out = outputs.out
    stopped = bool(history) and history[-1]["epoch"] < cfg.epochs and not cfg.dry_run
    if stopped:
        summary["stopped_after"] = history[-1]["epoch"]
        summary["checkpoint"] = str(checkpoint_path(out))
    elif not cfg.dry_run:
        with atomic_output(out, outputs.force) as tmp:
            save_model(tmp, model, arch, pre, num_classes,
                       {k: v for k, v in summary.items() if k != "history"}, **outputs.names)
        checkpoint_path(out).unlink(missing_ok=True)
        summary["out"] = str(out)
    rows = [[k, outputs.precision_note if k == "precision" and outputs.precision_note else v]
            for k, v in summary.items() if v is not None and k in _SHOWN]
    reporter.table(outputs.title, ["", "value"], rows)
    dist.barrier()
    return summary


# The rows of the results table that ends train and train-student.
_SHOWN = ("architecture", "params", "T", "alpha", "loss", "targets", "tail", "epochs", "precision",
          "test_errors", "test_accuracy", "agreement", "train_error", "ranks", "seconds", "out",
          "stopped_after", "checkpoint")


def train(data: str = "mnist", *, arch: Architecture, out: str | Path = "model.safetensors",
          config: TrainConfig | None = None, augment: AugmentConfig | None = None,
          eval_data: str | None = "auto", limit: int | None = None,
          num_classes: int | None = None, force: bool = False, resume: bool = False,
          reporter: Reporter | None = None,
          data_options: DataOptions | None = None) -> dict[str, Any]:
    """Train a kdcli model on hard labels (how users make teachers and baselines).

    Args:
        data: Labelled training data spec.
        arch: The architecture.
        out: Output model file.
        config: Optimization settings.
        augment: Augmentation of the training images (default none).
        eval_data: Data for per-epoch test errors; ``auto`` is ``mnist:test`` for MNIST.
        limit: Use only the first N training examples.
        num_classes: The model's class count (default: the largest label + 1, refused when
            the labels do not support it; see :func:`class_count`).
        force: Overwrite ``out``.
        resume: Continue from ``out``'s checkpoint.
        reporter: Output sink.
        data_options: How tables and image folders are read (for ``data`` and
            ``eval_data``).

    Returns:
        The training summary (also stored in the model file).
    """
    import torch
    import torch.nn.functional as F

    from kdcli.checks import resolve_device
    from kdcli.data.sources import load_data
    from kdcli.distributed import session

    cfg = config or TrainConfig()
    cfg.check()
    aug = augment or AugmentConfig()
    aug.check()
    arch.check()
    rep = reporter or Reporter()
    if not cfg.dry_run:
        check_train_outputs(out, force, resume, data_files(data) + data_files(eval_data))
    start = time.perf_counter()
    ds = load_data(data, limit=limit, options=data_options)
    if ds.labels is None:
        raise UsageError(f"{ds.source} has no labels", "kdcli train needs labelled data")
    cfg, precision_note = _concrete(cfg, len(ds))
    eval_ds = _eval_data(eval_data, ds.source, data_options, ds.class_names, ds.source,
                         list(ds.sample_shape), f"{ds.source} has")
    num_classes = _train_classes(ds, eval_ds, num_classes)
    aug.check_shape(ds.sample_shape)
    model, pre = _build(arch, cfg, ds.inputs, num_classes)
    labels = ds.labels

    def step(z: torch.Tensor, idx: torch.Tensor):
        y = labels[idx].to(z.device)
        loss = F.cross_entropy(z, y)
        return loss, torch.stack([loss.detach(), (z.argmax(-1) != y).float().mean()])

    fingerprint = {"command": "train", "data": ds.source, "arch": arch.to_dict(),
                   "config": cfg.settings(), "augment": aug.settings()}
    training = {"command": "train", "architecture": arch.spec(), "data": ds.source,
                **_recorded(data_options), **cfg.settings(), **aug.settings()}
    outputs = _Outputs(out, force, f"Trained {arch.spec()} on {ds.source}", start,
                       {"class_names": ds.class_names, "feature_names": ds.feature_names},
                       precision_note)
    with session(resolve_device(cfg.device)) as dist:
        history = fit(model, arch, ds.inputs, step, ["train_loss", "train_error"], cfg,
                      eval_data=eval_ds, checkpoint=None if cfg.dry_run else checkpoint_path(out),
                      fingerprint=fingerprint, resume=resume, reporter=rep, dist=dist,
                      augment=aug)
        return _finish(model, arch=arch, pre=pre, num_classes=num_classes, training=training,
                       history=history, eval_ds=eval_ds, cfg=cfg, outputs=outputs,
                       reporter=rep, dist=dist)


def _concrete(cfg: TrainConfig, n: int) -> tuple[TrainConfig, str | None]:
    """``cfg`` made concrete for ``n`` examples (epochs and precision, see
    :meth:`TrainConfig.resolved`), and what ``--precision auto`` chose and why (None when
    the precision was given), for the results table."""
    from kdcli.checks import precision_note, resolve_device

    note = precision_note(cfg.precision, resolve_device(cfg.device))
    cfg = cfg.resolved(n)
    cfg.check()
    return cfg, note


def _build(arch: Architecture, cfg: TrainConfig, inputs: torch.Tensor | Rows,
           num_classes: int) -> tuple[nn.Module, Preprocessing]:
    """A freshly initialized model (seeded by ``cfg.seed``) and its input preprocessing,
    fitted on ``inputs``."""
    import torch

    torch.manual_seed(cfg.seed)
    pre = fit_preprocessing(inputs, _normalize(cfg, arch), cfg.normalize_by)
    return build_model(arch, pre, num_classes), pre


def _eval_data(eval_data: str | None, source: str, data_options: DataOptions | None,
               class_names: list[str] | None, names_of: str, shape: list[int],
               shape_of: str) -> Data | None:
    """The data of ``--eval-data`` (``auto``: mnist:test for MNIST ``source``), refused unless
    its class names and example shape match the training data's."""
    from kdcli.data.base import check_same_classes
    from kdcli.data.sources import load_data

    spec = _default_eval(eval_data, source)
    if not spec:
        return None
    eval_ds = load_data(spec, options=data_options)
    check_same_classes(class_names, names_of, eval_ds.class_names, eval_ds.source)
    if list(eval_ds.sample_shape) != shape:
        raise UsageError(f"--eval-data {spec} has examples of shape "
                         f"{list(eval_ds.sample_shape)}, but {shape_of} {shape}",
                         "Pass --eval-data with matching examples, or --eval-data none")
    return eval_ds


def _train_classes(ds: Data, eval_ds: Data | None, num_classes: int | None) -> int:
    """The class count of a model trained on ``ds`` (see :func:`class_count`), at most the
    number of class names the data gives."""
    num_classes = class_count(ds, eval_ds, num_classes)
    if ds.class_names is not None and num_classes != len(ds.class_names):
        if num_classes > len(ds.class_names):  # --num-classes more than the names
            raise UsageError(f"--num-classes {num_classes}, but {ds.source} names "
                             f"{len(ds.class_names)} classes", "Drop --num-classes")
        num_classes = len(ds.class_names)  # a slice without the last classes' examples
    return num_classes


def _recorded(data_options: DataOptions | None) -> dict[str, Any]:
    """``data_options`` as the model file records them (nothing for the defaults)."""
    recorded = data_options.recorded() if data_options is not None else {}
    return {"data_options": recorded} if recorded else {}


def _recorded_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The data options a transfer set records for its data (nothing for the defaults)."""
    return {"data_options": meta["data_options"]} if meta.get("data_options") else {}


# A class count is refused (unless --num-classes is given) when more of its classes have no
# training example than this, and than the classes that have one: a stray label of 1,000,000
# among 500 examples would otherwise build a 1,000,001-class model.
MAX_EMPTY_CLASSES = 10


def class_count(ds: Data, eval_ds: Data | None, num_classes: int | None) -> int:
    """The class count of a model trained on ``ds``: ``num_classes`` if given (it must cover
    every label), else the largest label + 1 when the labels support it.

    Raises:
        UsageError: ``num_classes`` is too small, or (without it) more than
            ``max(MAX_EMPTY_CLASSES, distinct labels)`` classes would have no example.
    """
    top = max(ds.num_classes or 0, eval_ds.num_classes or 0 if eval_ds else 0)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not 1 <= num_classes <= 1 << 24:
            raise UsageError(f"--num-classes must be from 1 to {1 << 24:,}, got {num_classes}",
                             "Try --num-classes 10")
        if num_classes < top:
            raise UsageError(f"--num-classes {num_classes}, but the labels go up to {top - 1}",
                             f"Pass --num-classes {top} or more")
        return num_classes
    distinct = int(ds.labels.unique().numel())
    empty = top - distinct
    if empty > max(MAX_EMPTY_CLASSES, distinct):
        raise UsageError(f"the labels go up to {top - 1}, but only {distinct} distinct labels "
                         f"occur: a {top:,}-class model would have {empty:,} classes with no "
                         "example", "Check the labels, or pass --num-classes to mean it")
    return top


def train_student(transfer: str | Path = "transfer.safetensors", *, arch: Architecture,
                  distill: DistillConfig | None = None, alpha: float | None = None,
                  T: float | None = None, loss: str | None = None, center: bool | None = None,
                  tail: str | None = None, out: str | Path = "student.safetensors",
                  config: TrainConfig | None = None, eval_data: str | None = "auto",
                  force: bool = False, resume: bool = False, reporter: Reporter | None = None,
                  data_options: DataOptions | None = None) -> dict[str, Any]:
    """Train a student against a transfer set (Hinton et al. 2015).

    ``--loss kd``: ``L = alpha*CE(y, softmax(z)) + (1-alpha)*T^2*CE(p_T, softmax(z/T))``.
    ``--loss mse``: ``L = alpha*CE(y, softmax(z)) + (1-alpha)*1/2*mean_i (z_i - v_i)^2``, the
    exact high-T limit of ``kd`` (see :class:`kdcli.training.losses.LogitMSELoss`).

    The transfer set (one file or a sharded set) is memory-mapped and read a batch at a
    time, so memory does not grow with its size. Under torchrun, training is data-parallel
    (see :func:`fit`) and rank 0 writes the outputs.

    Args:
        transfer: Transfer-set file, or the ``.index.json`` of a sharded set.
        arch: Student architecture.
        distill: The distillation settings (default :class:`~kdcli.config.DistillConfig`:
            alpha 0.1, the kd loss at the transfer set's T). A T other than the set's
            re-derives the soft targets exactly from the stored logits where they allow it.
        alpha: Shorthand for ``distill.alpha``, the weight on the hard labels, in [0, 1].
        T: Shorthand for ``distill.T``.
        loss: Shorthand for ``distill.loss``: ``kd`` or ``mse`` (logit matching).
        center: Shorthand for ``distill.center`` (``mse``: centre both logit vectors).
        tail: Shorthand for ``distill.tail`` (top-k sets; see :mod:`kdcli.training.losses`).
        out: Output student model file.
        config: Optimization settings (default: :func:`student_config`, lr 0.05 after a
            1-epoch warmup, gradients clipped to norm 5).
        eval_data: Data for per-epoch test errors; ``auto`` is ``mnist:test`` for MNIST.
        force: Overwrite ``out``.
        resume: Continue from ``out``'s checkpoint.
        reporter: Output sink.
        data_options: How a table or image folder given as ``eval_data`` is read.

    Returns:
        The training summary (also stored in the student file).
    """
    from kdcli.checks import resolve_device
    from kdcli.distributed import session
    from kdcli.transfer.base import (
        check_class_memory,
        check_unchanged,
        file_stamps,
        load_transfer_set,
    )

    d = _with(distill or DistillConfig(), T=T, alpha=alpha, loss=loss, center=center, tail=tail)
    cfg = config or student_config()
    cfg.check()
    arch.check()
    rep = reporter or Reporter()
    d.check()
    if not cfg.dry_run:
        check_train_outputs(out, force, resume,
                            [transfer, *data_files(transfer), *data_files(eval_data)])
    start = time.perf_counter()
    ts = load_transfer_set(transfer)
    stamps = file_stamps(ts)
    if d.alpha > 0 and not ts.has_labels:
        raise UsageError(f"--alpha {d.alpha} needs labels, but {transfer} has none",
                         "Use --alpha 0 (pure distillation) or a labelled transfer set")
    cfg, precision_note = _concrete(cfg, int(ts.columns["inputs"].shape[0]))
    check_class_memory(ts.path, ts.num_classes, cfg.batch_size)
    d = d.resolved(ts.T)
    _check_targets(ts, d, rep)
    step = _student_step(ts, d)
    eval_ds = _student_eval_data(ts, Path(transfer).name, eval_data, data_options)
    transfer_sha = sha256_file(ts.path)
    inputs = ts.columns["inputs"]
    model, pre = _build(arch, cfg, inputs, ts.num_classes)
    training, fingerprint = _student_record(ts, Path(transfer).name, transfer_sha, arch, d, cfg,
                                            data_options)
    outputs = _Outputs(out, force, f"Distilled {arch.spec()} from {Path(transfer).name}", start,
                       {"class_names": ts.meta.get("class_names"),
                        "feature_names": ts.meta.get("feature_names")}, precision_note)
    with session(resolve_device(cfg.device)) as dist:
        history = fit(model, arch, inputs, step, ["train_loss", "hard", "soft", "agreement"],
                      cfg, eval_data=eval_ds,
                      checkpoint=None if cfg.dry_run else checkpoint_path(out),
                      fingerprint=fingerprint, resume=resume, reporter=rep, dist=dist)
        check_unchanged(ts, stamps)  # trained on the bytes that were checked, or nothing
        return _finish(model, arch=arch, pre=pre, num_classes=ts.num_classes,
                       training=training, history=history, eval_ds=eval_ds, cfg=cfg,
                       outputs=outputs, reporter=rep, dist=dist)


def _with(distill: DistillConfig, **fields: Any) -> DistillConfig:
    """``distill`` with the ``fields`` that are not None put in."""
    given = {k: v for k, v in fields.items() if v is not None}
    return replace(distill, **given) if given else distill


def _check_targets(ts, d: DistillConfig, rep: Reporter) -> None:
    """Fail early, saying why, if the transfer set cannot give the targets ``d`` asks for."""
    import torch

    from kdcli.training.losses import matches_logits

    probe = torch.arange(1)
    if matches_logits(d):
        ts.teacher_logits(probe)  # fails for top-k sets
        return
    ts.targets(probe, d.T)  # T cannot always be re-derived
    if d.T != ts.T:
        how = "each member's" if "member_logits" in ts.columns else "the stored"
        rep.info(f"re-deriving soft targets at T={d.T:g} from {how} logits "
                 f"(the transfer set was made at T={ts.T:g})")


def _student_step(ts, d: DistillConfig) -> StepLoss:
    """The loss of a batch of the transfer set ``ts``, and its statistics: the total, hard and
    soft losses and the agreement with the teacher's predictions."""
    import torch

    from kdcli.training.losses import criterion, matches_logits
    from kdcli.transfer.base import to_device

    teacher_pred = ts.teacher_argmax()
    labels = ts.columns["labels"] if d.alpha > 0 else None
    crit, logits = criterion(d), matches_logits(d)

    def step(z: torch.Tensor, idx: torch.Tensor):
        target = ts.teacher_logits(idx) if logits else ts.targets(idx, d.T)
        y = None if labels is None else labels[idx].long().to(z.device)
        total, hard, soft = crit(z, to_device(target, z.device), y)
        agree = (z.argmax(-1) == teacher_pred[idx].to(z.device)).float().mean()
        return total, torch.stack([total.detach(), hard.detach(), soft.detach(), agree])

    return step


def _student_eval_data(ts, name: str, eval_data: str | None,
                       data_options: DataOptions | None) -> Data | None:
    """The data of ``--eval-data`` for a student of ``ts``, refused unless its classes and
    example shape match."""
    eval_ds = _eval_data(eval_data, str(ts.meta.get("data_source", "")), data_options,
                         ts.meta.get("class_names"), f"transfer set {name}",
                         list(ts.columns["inputs"].shape[1:]), "the transfer set's are")
    if eval_ds is not None and eval_ds.labels is not None and (
            int(eval_ds.labels.max()) >= ts.num_classes):
        raise UsageError(f"--eval-data has labels up to {int(eval_ds.labels.max())}, but the "
                         f"transfer set has {ts.num_classes} classes", "Use matching data")
    return eval_ds


def _student_record(ts, name: str, transfer_sha: str, arch: Architecture, d: DistillConfig,
                    cfg: TrainConfig, data_options: DataOptions | None) -> tuple[dict, dict]:
    """What a student's model file records of its training, and the fingerprint of the
    settings that a resumed run must match."""
    topk = ts.storage == "top-k"
    teachers = [{k: t.get(k) for k in ("file", "sha256", "format", "training")}
                for t in ts.meta.get("teachers", [])]
    training = {"command": "train-student", "architecture": arch.spec(),
                "transfer": name, "transfer_sha256": transfer_sha,
                "data": ts.meta.get("data_source"), "T": d.T, "alpha": d.alpha, "loss": d.loss,
                "center": d.center if d.loss == "mse" else None,
                "targets": ts.storage if not topk else f"top-{ts.top_k}",
                "tail": d.tail if topk and d.loss == "kd" else None, "teachers": teachers,
                **(_recorded(data_options) or _recorded_meta(ts.meta)),
                **cfg.settings()}
    if ts.meta.get("class_names"):
        training["class_names"] = ts.meta["class_names"]
    fingerprint = {"command": "train-student", "transfer_sha256": transfer_sha,
                   "arch": arch.to_dict(), **d.settings(topk), "config": cfg.settings()}
    return training, fingerprint
