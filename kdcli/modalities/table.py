"""Table rows: examples of shape ``[F]``, one value per feature."""

from __future__ import annotations

import torch
from torch import nn

from kdcli.errors import ModelError
from kdcli.modalities.base import Modality
from kdcli.preprocessing import Preprocessing


class Table(Modality):
    """Rows of ``F`` numeric features, standardised per feature by default."""

    name = "table"

    def normalize_by(self, raw_shape: list[int]) -> str:
        return "feature"

    def student_preprocess(self, pre: Preprocessing, in_shape: list[int]) -> nn.Module:
        """A student's encoding of its columns (missing numbers, categories) when it has
        one, else per-feature standardisation."""
        if pre.table is None:
            return super().student_preprocess(pre, in_shape)
        from kdcli.students.table_encoding import EncodeTable, TableEncoding

        return EncodeTable(TableEncoding.from_json(pre.table))

    def teacher_layout(self, x: torch.Tensor, pre: Preprocessing, shape: list[int] | None,
                       name: str) -> torch.Tensor:
        """As :meth:`Modality.teacher_layout`, but a teacher of one row of another width is
        told in columns (``--feature-columns``), not in shapes."""
        if shape is not None and len(shape) == 1 and not pre.size and shape[0] != x.shape[1]:
            raise ModelError(f"teacher {name} takes rows of {shape[0]} columns, but the data "
                             f"has {x.shape[1]} feature columns",
                             "Choose the columns the teacher was trained on, in its order, "
                             "with --feature-columns")
        return super().teacher_layout(x, pre, shape, name)


TABLE = Table()
