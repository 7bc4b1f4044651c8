"""Checkpoints of a training run: written after each reported epoch, read by ``--resume``.

A checkpoint (``OUT.ckpt``, next to the model file ``OUT``) holds the model, optimizer,
generator and RNG states, the history so far and the fingerprint of the settings that a
resumed run must match.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from kdcli.errors import FormatError, OutputExistsError, UsageError, first_line
from kdcli.io.files import atomic_output, check_output, check_writable
from kdcli.transfer.layout import is_index_path, own_shards


def save_checkpoint(path: Path, fingerprint: dict, epoch: int, history: list, model, opt,
                    gen) -> None:
    """Write the checkpoint of a run after ``epoch`` epochs (atomically) to ``path``."""
    state = {"fingerprint": json.dumps(fingerprint, sort_keys=True), "epoch": epoch,
             "history": json.dumps(history), "model": model.state_dict(),
             "optimizer": opt.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state()}
    with atomic_output(path, force=True) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path | None, fingerprint: dict, model, opt, gen,
                    epochs: int) -> tuple[int, list]:
    """Restore ``model``, ``opt``, ``gen`` and torch's RNG from the checkpoint at ``path``;
    return its epoch and history.

    Raises:
        UsageError: there is no checkpoint, or it comes from other settings (``fingerprint``).
        FormatError: it is damaged, or records an epoch outside ``0..epochs``.
    """
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
                         "Rerun with the original options, or drop --resume and pass "
                         "--force to start afresh with these (this discards it)")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return epoch, json.loads(state["history"])


def _pickle_like(path: Path) -> bool:
    """Whether ``path`` starts as a zip archive (torch.save) or a pickle (its legacy format)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and head[1] <= 5)


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
    return [f for i in inputs if is_index_path(i) for f in own_shards(i)]
