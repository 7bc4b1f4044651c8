"""The settings of training and distillation: :class:`TrainConfig`, :class:`DistillConfig`
and the defaults of ``train`` and ``train-student``, each in this one place.

Light to import (no torch, no models), so the command line takes its option defaults from
here and ``kdcli --help`` shows them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from kdcli.checks import (
    check_batch_size,
    check_device,
    check_momentum,
    check_precision,
    check_seed,
    check_temperature,
    check_weight_decay,
)
from kdcli.errors import UsageError

# Without --epochs: this many passes, or more on a small set so that training takes at least
# MIN_STEPS optimizer steps, but never more than MAX_AUTO_EPOCHS passes.
DEFAULT_EPOCHS = 20
MIN_STEPS = 2000
MAX_AUTO_EPOCHS = 1000

# train-student's defaults. The T^2 factor makes a student's first gradients large, so a
# higher lr needs a warmup; with one, lr 0.05 beat lr 0.02 on every MNIST student measured
# (2x800: 88 vs 101 errors; 2x300 at T=20: 101 vs 140; see examples/mnist-paper).
STUDENT_LR = 0.05
STUDENT_WARMUP = 1.0
# ... and its gradient clipping. Healthy MNIST and table students take steps of norm 0.5-4
# and are not changed by it; without it, a rare step of norm 100-10^4 left a 2x300 on 10,000
# digits at 837 test errors (213 with it), and one from a raw-pixel teacher at chance.
STUDENT_GRAD_CLIP = 5.0


@dataclass(kw_only=True)
class TrainConfig:
    """Optimization settings shared by ``train`` and ``train-student``."""

    # Passes over the data. None: DEFAULT_EPOCHS, or more on a small set, so that training
    # takes at least MIN_STEPS steps (see resolved()).
    epochs: int | None = None
    batch_size: int = 256  # examples per step
    lr: float = 0.1  # peak learning rate
    optimizer: str = "sgd"  # sgd (Nesterov momentum) or adam
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # L2 penalty
    schedule: str = "cosine"  # cosine: decay to 0 per step; constant: keep lr
    # auto (bf16 autocast on a GPU or CPU with bf16 units, else fp32), fp32 or bf16; see
    # kdcli.checks.resolve_precision. resolved() makes auto concrete.
    precision: str = "auto"
    seed: int = 0  # seeds initialization, shuffling, dropout and augmentation
    dry_run: bool = False  # train one batch, write nothing
    # Zero-mean, unit-variance inputs (False: only scaled, 8-bit pixels to [0, 1]). None: auto,
    # normalize unless the model has input dropout, so that a dropped pixel is black.
    normalize: bool | None = None
    stop_after: int | None = None  # stop after this epoch, keeping the checkpoint to resume
    device: str = "cpu"  # cpu, cuda, or auto (cuda when present)
    # Epochs of linear warmup from 0 to lr, per step, before the schedule (0: none). It lets
    # a higher lr train stably where the first steps' large gradients would blow it up.
    warmup: float = 0.0
    # How normalize standardizes: auto (by example shape: tables per feature, [C, H, W]
    # images per channel, else one scalar), scalar, channel or feature; see
    # kdcli.students.base.normalize_by.
    normalize_by: str = "auto"
    # Rescale each step's gradient to at most this L2 norm (0: never). A safety net against
    # the rare huge step that kills a small net's ReLUs; healthy steps are far below it.
    grad_clip: float = 0.0
    # A table's category column becomes at most this many one-hot inputs in the student: the
    # most frequent categories, and one "other" input for the rest (see
    # kdcli.students.table_encoding).
    max_categories: int = 32

    def check(self) -> None:
        """Refuse settings out of range (UsageError, naming the option and a valid value)."""
        from kdcli.preprocessing import NORMALIZE_BY

        if self.epochs is not None and self.epochs <= 0:
            raise UsageError(f"--epochs must be positive, got {self.epochs}", "Try --epochs 20")
        _check_epochs_bound(self.epochs)
        check_batch_size(self.batch_size, "Try --batch-size 256")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {self.lr}", "Try --lr 0.05")
        check_momentum(self.momentum)
        check_weight_decay(self.weight_decay)
        if self.optimizer not in ("sgd", "adam"):
            raise UsageError(f"unknown --optimizer {self.optimizer!r}", "Use sgd or adam")
        if self.schedule not in ("cosine", "constant"):
            raise UsageError(f"unknown --schedule {self.schedule!r}", "Use cosine or constant")
        check_precision(self.precision)
        check_device(self.device)
        check_seed(self.seed)
        most = self.epochs if self.epochs is not None else DEFAULT_EPOCHS  # auto: at least
        if not (math.isfinite(self.warmup) and 0 <= self.warmup <= most):
            raise UsageError(f"--warmup must be between 0 and --epochs ({most}), "
                             f"got {self.warmup:g}", "Try --warmup 1")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UsageError(f"--grad-clip must be 0 (off) or a positive norm, got "
                             f"{self.grad_clip:g}", "Try --grad-clip 5")
        if self.normalize_by not in NORMALIZE_BY:
            raise UsageError(f"unknown --normalize-by {self.normalize_by!r}",
                             f"Use one of {', '.join(NORMALIZE_BY)}")
        if isinstance(self.max_categories, bool) or not 2 <= self.max_categories <= 1 << 16:
            raise UsageError(f"--max-categories must be from 2 to {1 << 16}, got "
                             f"{self.max_categories}", "Try --max-categories 32")
        if self.stop_after is not None and self.stop_after < 1:
            raise UsageError(f"--stop-after must be a positive epoch, got {self.stop_after}",
                             "Try --stop-after 10")

    def resolved(self, n: int) -> TrainConfig:
        """This config made concrete for ``n`` training examples on its device.

        ``epochs=None`` (auto) becomes DEFAULT_EPOCHS passes, or as many more as MIN_STEPS
        steps need (up to MAX_AUTO_EPOCHS): the 8x8 digits' 1,257 training rows take 5 steps
        an epoch, so 20 epochs were 100 steps and 27 test errors, against 9-10 after 1,500
        steps. ``precision="auto"`` becomes fp32 or bf16 by the hardware
        (:func:`~kdcli.checks.resolve_precision`).
        """
        cfg = self
        if cfg.epochs is None:
            steps = math.ceil(n / max(1, min(cfg.batch_size, n)))
            epochs = min(MAX_AUTO_EPOCHS, max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / steps)))
            cfg = replace(cfg, epochs=epochs)
        if cfg.precision == "auto":
            from kdcli.checks import resolve_device, resolve_precision

            cfg = replace(cfg, precision=resolve_precision("auto", resolve_device(cfg.device))[0])
        return cfg

    def settings(self) -> dict[str, Any]:
        """The settings that change the result (what a resumed run or a kept model must match)."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_FINGERPRINTED}


def student_config(**settings: Any) -> TrainConfig:
    """train-student's defaults (lr, warmup and gradient clipping), with ``settings`` on top."""
    return TrainConfig(**{"lr": STUDENT_LR, "warmup": STUDENT_WARMUP,
                          "grad_clip": STUDENT_GRAD_CLIP, **settings})


# Settings that do not change the result, so a resumed run may differ in them.
_NOT_FINGERPRINTED = ("dry_run", "stop_after", "device")

LOSSES = ("kd", "mse")
# How a top-k transfer set's probability mass outside the top K is treated (see
# kdcli.training.losses.DistillationLoss).
TAIL_RULES = ("student", "uniform", "renormalize")
# sweep's students learn from the soft targets alone, so that the table shows T's effect.
SWEEP_ALPHA = 0.0


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """How a student learns from a transfer set (``train-student``; ``sweep`` varies T)."""

    T: float | None = None  # temperature; None: the transfer set's
    alpha: float = 0.1  # weight on the hard labels, in [0, 1]
    loss: str = "kd"  # kd (soft cross-entropy at T) or mse (logit matching)
    center: bool = True  # mse: centre both logit vectors per example
    tail: str = "student"  # top-k sets: student, uniform or renormalize

    def check(self) -> None:
        """Refuse settings out of range (UsageError, naming the option and a valid value)."""
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise UsageError(f"--alpha must lie in [0, 1], got {self.alpha}", "Try --alpha 0.1")
        if self.loss not in LOSSES:
            raise UsageError(f"unknown --loss {self.loss!r}", "Use kd or mse")
        if self.tail not in TAIL_RULES:
            raise UsageError(f"unknown --tail {self.tail!r}",
                             f"Use one of {', '.join(TAIL_RULES)}")
        if self.T is not None:
            check_temperature(self.T)

    def resolved(self, transfer_T: float) -> DistillConfig:
        """This config with ``T=None`` made the transfer set's ``transfer_T``."""
        return replace(self, T=float(transfer_T if self.T is None else self.T))

    def settings(self, top_k: bool) -> dict[str, Any]:
        """The settings that change the result (what a resumed run must match); ``tail``
        only counts for a top-k set."""
        return {"alpha": self.alpha, "T": self.T, "loss": self.loss, "center": self.center,
                "tail": self.tail if top_k else None}


def _check_epochs_bound(epochs: int | None) -> None:
    """Refuse an --epochs no run could finish (UsageError naming the bound)."""
    from kdcli.resources import MAX_EPOCHS, check_count

    if epochs is not None:
        check_count(epochs, "--epochs", MAX_EPOCHS, "Try --epochs 20")


@dataclass(frozen=True)
class WordsConfig:
    """How a text student's words are chosen (``--vocab-size``, ``--min-count``,
    ``--max-words``).

    Attributes:
        vocab_size: The most entries of the vocabulary, padding and unknown included.
        min_count: A word seen fewer times in the training texts is unknown.
        max_words: Texts are cut after this many words (said, with how many were); with
            ``tokenizer``, after this many tokens, special tokens included.
        tokenizer: A subword tokenizer instead of the word vocabulary: ``teacher`` (the
            Hugging Face teacher of the transfer set, found by its recorded name beside the
            set or in the current folder), a Hugging Face folder (whose input embeddings
            then start a ``transformer`` student's), or a ``tokenizer.json`` (None: words).
    """

    vocab_size: int = 20000
    min_count: int = 2
    max_words: int = 128
    tokenizer: str | None = None

    def check(self) -> None:
        """Raise UsageError for values no vocabulary can take."""
        if not 3 <= self.vocab_size <= 1 << 22:
            raise UsageError(f"--vocab-size must be from 3 to {1 << 22:,}, got "
                             f"{self.vocab_size}", "Try --vocab-size 20000")
        if not 1 <= self.min_count <= 1 << 20:
            raise UsageError(f"--min-count must be 1 or more, got {self.min_count}",
                             "Try --min-count 2")
        if not 1 <= self.max_words <= 1 << 16:
            raise UsageError(f"--max-words must be from 1 to {1 << 16:,}, got "
                             f"{self.max_words}", "Try --max-words 128")

    def settings(self) -> dict[str, Any]:
        """The settings a model file's training record keeps."""
        return {"vocab_size": self.vocab_size, "min_count": self.min_count,
                "max_words": self.max_words,
                **({"tokenizer": self.tokenizer} if self.tokenizer else {})}
