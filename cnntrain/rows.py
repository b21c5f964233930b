"""Results as text for scripts: JSON, or CSV with one header line, for every command that prints rows.

``bench`` and ``models`` print lists of flat dicts; ``eval`` prints one report. Each goes through
here so that every command's ``--format csv`` follows one rule: a header, comma-separated,
lists joined by ``;``, no trailing table decoration.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ";".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    return "" if value is None else value


def to_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """One CSV row per dict; the columns are every key, in first-seen order, unless given."""
    rows = list(rows)
    fields = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(v) for k, v in r.items()})
    return buf.getvalue()


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    """``json`` (a list of objects) or ``csv`` (a header, one line per row)."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    return to_csv(rows)
