"""Table rows: examples of shape ``[F]``, one value per feature."""

from __future__ import annotations

from kdcli.modalities.base import Modality


class Table(Modality):
    """Rows of ``F`` numeric features, standardised per feature by default."""

    name = "table"

    def normalize_by(self, raw_shape: list[int]) -> str:
        return "feature"


TABLE = Table()
