"""A small table of metrics (e.g. ROI values before/after denoising) that renders to CSV and Markdown.

The same object feeds the CLI report, the docs and the Slicer table node (via :meth:`as_dict`), so
every front end shows the same numbers with the same names.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from IPv2DenoiseLib.core.errors import UserError

DEFAULT_COLUMNS = ("metric", "before", "after", "change", "unit")


@dataclass
class MetricsTable:
    """Rows of values under named columns.

    Attributes
    ----------
    columns : list of str
        Column names; default ``metric, before, after, change, unit``.
    rows : list of list
        One list per row, as long as ``columns``. ``None`` is an empty cell (e.g. a value that does
        not apply); floats may be NaN (shown as ``nan`` / ``n/a``).
    float_format : str
        Format spec for floats in :meth:`to_markdown` (CSV keeps 6 significant digits).
    """

    columns: list[str] = field(default_factory=lambda: list(DEFAULT_COLUMNS))
    rows: list[list[Any]] = field(default_factory=list)
    float_format: str = ".2f"

    def add_row(self, *values: Any, **named: Any) -> None:
        """Append a row, given positionally (all columns) or by column name (missing → ``None``).

        Raises
        ------
        UserError
            If the number of values or a column name does not fit :attr:`columns`.
        """
        if values and named:
            raise UserError("add_row: give values positionally or by column name, not both")
        if named:
            unknown = sorted(set(named) - set(self.columns))
            if unknown:
                raise UserError(f"add_row: unknown column(s) {unknown}; columns are {self.columns}")
            values = tuple(named.get(c) for c in self.columns)
        if len(values) != len(self.columns):
            raise UserError(
                f"add_row: got {len(values)} values for {len(self.columns)} columns {self.columns}"
            )
        self.rows.append(list(values))

    def as_dict(self) -> dict[str, list[Any]]:
        """Column-oriented copy ``{column: [value per row]}`` (JSON- and Slicer-table-friendly)."""
        return {c: [row[i] for row in self.rows] for i, c in enumerate(self.columns)}

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """Render as CSV (comma-separated, ``\\n`` line ends); also write it to ``path`` if given."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow([_cell(v, ".6g", "nan") for v in row])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        return text

    def to_markdown(self) -> str:
        """Render as a GitHub-flavoured Markdown table (floats with :attr:`float_format`)."""
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            cells = [_cell(v, self.float_format, "n/a").replace("|", "\\|") for v in row]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _cell(value: Any, float_format: str, nan_text: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        value = float(value)
        return nan_text if math.isnan(value) else format(value, float_format)
    return str(value)
