"""The MNIST copy bundled with kdcli as a data source: ``mnist``, ``mnist:train``,
``mnist:test``; its files are checked against their SHA256SUMS once per process."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from kdcli.data.base import DataOptions, Loaded
from kdcli.data.idx import load_split
from kdcli.errors import DataError

MNIST_DIR = Path(__file__).parent.parent / "datasets" / "mnist"


def read(name: str, split: str, options: DataOptions) -> Loaded:
    """The ``split`` (default ``train``) of the bundled MNIST, after its checksum check."""
    check_bundled_mnist()
    return Loaded(*load_split(MNIST_DIR, split or "train", "mnist"))


@functools.cache
def check_bundled_mnist() -> None:
    """Verify the bundled MNIST against its SHA256SUMS, once per process (DataError if not)."""
    sums = (MNIST_DIR / "SHA256SUMS").read_text().split("\n")
    for line in filter(None, sums):
        digest, fname = line.split()
        f = MNIST_DIR / fname
        if not f.exists() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise DataError(f"bundled MNIST file {fname} is missing or damaged",
                            "Reinstall kdcli")
