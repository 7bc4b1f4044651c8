"""A teacher epoch (784-1200-1200-10, dropout 0.2/0.5, max-norm, jitter) with kdcli's
byte-mask dropout against the same run with torch's nn.Dropout, fp32 and bf16."""

import tempfile
from pathlib import Path
from unittest import mock

from common import report
from torch import nn

import kdcli.students.mlp
from kdcli.data.augment import AugmentConfig
from kdcli.students.base import Architecture
from kdcli.train import TrainConfig, train

DATA = "mnist[:30000]"


def epoch_seconds(precision: str, out: Path) -> float:
    arch = Architecture.parse("mlp:1200,1200", dropout=0.5, input_dropout=0.2, max_norm=3.0)
    s = train(DATA, arch=arch, out=out, eval_data="none", force=True,
              config=TrainConfig(epochs=2, precision=precision),
              augment=AugmentConfig(jitter=2))
    return s["history"][-1]["seconds"]


def main() -> None:
    out = Path(tempfile.mkdtemp()) / "t.safetensors"
    rows, result = [], {}
    for precision in ("fp32", "bf16"):
        with mock.patch.object(kdcli.students.mlp, "ByteDropout", nn.Dropout):
            torch_s = epoch_seconds(precision, out)
        kd_s = epoch_seconds(precision, out)
        result[precision] = {"nn_dropout_s": torch_s, "byte_dropout_s": kd_s,
                             "speedup": torch_s / kd_s}
        rows.append((f"{precision}: nn.Dropout", f"{torch_s:.2f} s / epoch of 30,000"))
        rows.append((f"{precision}: kdcli byte dropout", f"{kd_s:.2f} s  ({torch_s / kd_s:.2f}x)"))
    report("teacher epoch", rows, result)


if __name__ == "__main__":
    main()
