"""The one Rich table type of the command line: cells wrap instead of being cut, so that identifiers,
hashes and numbers are never truncated (``block-sum-p…``), whatever the width of the output."""

from __future__ import annotations

from typing import Any

from rich import table


class Table(table.Table):
    """``rich.table.Table`` whose columns fold long cells onto more lines rather than ending them with an ellipsis."""

    def add_column(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)
