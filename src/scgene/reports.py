"""What the evaluation reports share: markdown tables, target checklists, and saving a report atomically."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .fileio import atomic_path


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub markdown table: floats to `digits`, NaN as a dash (reset the index to show it)."""
    def cell(value):
        if isinstance(value, (float, np.floating)):
            return "–" if np.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|---" * len(table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def target_lines(checks) -> str:
    """A markdown checklist of (target, value, threshold, met) checks, one line each."""
    return "".join(f"- [{'x' if met else ' '}] {target}: {value:.3f} (needs {threshold:.3f})\n"
                   for target, value, threshold, met in checks)


class SavedReport:
    """A report with `to_markdown()` and `to_json()`, saved as either or both, each file written atomically."""

    def to_markdown(self) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def save(self, markdown: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None) -> None:
        for path, text in ((markdown, self.to_markdown), (json_path, self.to_json)):
            if path:
                content = text()
                with atomic_path(path) as staged:
                    staged.write_text(content if content.endswith("\n") else content + "\n", encoding="utf-8")
