"""The sections of report.html, each a small function from a :class:`RunRecord` to HTML.

Self-contained by construction: pictures are inlined as ``data:`` URIs, the style sheet is in
the page, and there is no script, so the file opens anywhere (a mail attachment, an air-gapped
machine, a CI artefact) and fetches nothing. Every number taken from summary.json carries its
key and exact value (``data-key``, ``data-value``) beside the rounded text, so a test, or a
script, can check the page against summary.json.

Keys added to summary.json by later features appear without a change here: scalars in the
figures table, lists of rows as tables, mappings as key/value tables.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any

from cnntrain import checkpoint, fileio
from cnntrain.report.run import KNOWN_PICTURES, RunRecord, read_run

REPORT_NAME = "report.html"
#: The figures shown large at the top, when summary.json has them.
HEADLINE = [("best_val_acc", "top-1"), ("best_val_balanced_acc", "balanced accuracy"),
            ("best_val_macro_f1", "macro-F1"), ("best_val_top5", "top-5")]
#: Lists and mappings of summary.json with a section of their own (or none: "files").
OWN_SECTION = {"per_class", "classes", "files", "confusion_matrix", "train_val_leak_pairs"}
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1100px;padding:1.5em;
color:#1d2330;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #d8dce5}
.status{color:#5a6275}.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #d8dce5;border-radius:8px;padding:.6em 1em;min-width:9em}
.card .v{font-size:1.5em;font-weight:600}.card .k{color:#5a6275;font-size:.85em}
table{border-collapse:collapse;margin:.4em 0}th,td{border:1px solid #d8dce5;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f5f9}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eceef3}
figcaption{color:#5a6275;font-size:.9em}.missing{color:#8a6d00}
"""


def write_report(run_dir: str | Path) -> Path:
    """(Re)write ``run_dir/report.html``; returns its path. Atomic, like every run file, and a
    failed write is a one-line error that leaves the previous page as it was."""
    page = build_report(run_dir)
    path = Path(run_dir) / REPORT_NAME
    with checkpoint.write_errors_reported(path):
        fileio.atomic_write_text(path, page)
    return path


def build_report(run_dir: str | Path) -> str:
    """The page of ``run_dir`` as one HTML string."""
    run = read_run(run_dir)
    body = [_header(run), _figures(run), _data(run), _pictures(run), _per_class(run), _other_results(run),
            _epochs(run), _configuration(run)]
    title = html.escape(f"cnntrain run {run.path.name}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style></head>"
            f"<body>\n" + "\n".join(part for part in body if part) + "\n</body></html>\n")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _shown(value: Any) -> str:
    """How a value reads on the page: ratios to 4 decimals, whole numbers as they are."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.4f}"  # (a learning rate of 1e-5)
    return str(value)


def _number(key: str, value: Any, css: str = "") -> str:
    """A summary.json value with its key and exact JSON value attached."""
    exact = json.dumps(value)
    return (f"<span class=\"{css}\" data-key=\"{_esc(key)}\" data-value=\"{_esc(exact)}\">"
            f"{_esc(_shown(value))}</span>")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A table of already-escaped cells; numbers right-aligned by the caller's ``n`` marker."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    lines = ["<tr>" + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row) + "</tr>"
             for row in rows]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class=\"n\">{_esc(_shown(value))}</td>" if numeric else f"<td>{_esc(_shown(value))}</td>"


def _header(run: RunRecord) -> str:
    s = run.summary or {}
    what = " on ".join(str(x) for x in (s.get("arch") or (run.config or {}).get("arch"),
                                        s.get("data") or (run.config or {}).get("data_path")) if x)
    if run.finished:
        status = f"finished: {s.get('epochs_run', '?')} epochs" + (", stopped early" if s.get("stopped_early") else "")
    else:
        status = (f"not finished (no summary.json): {len(run.metrics)} epoch(s) recorded; resume with "
                  f"<code>cnntrain train --resume {_esc(run.path)}</code>")
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return (f"<h1>cnntrain run {_esc(run.path.name)}</h1><p>{_esc(what)}</p>"
            f"<p class=\"status\">{status} · page written {written} (rewrite it with "
            f"<code>cnntrain report {_esc(run.path)}</code>)</p>")


def _figures(run: RunRecord) -> str:
    if not run.summary:
        return "<h2>Figures</h2><p class=\"missing\">No summary.json: the run did not finish.</p>"
    s = run.summary
    cards = "".join(f"<div class=\"card\"><div class=\"v\">{_number(key, s[key])}</div><div class=\"k\">"
                    f"{_esc(label)}</div></div>" for key, label in HEADLINE if s.get(key) is not None)
    scalars = [[_esc(key), f"<td class=\"n\">{_number(key, value)}</td>"] for key, value in s.items()
               if not isinstance(value, (list, dict))]
    return f"<h2>Figures</h2><div class=\"cards\">{cards}</div>" + _table(["summary.json", "value"], scalars)


def _data(run: RunRecord) -> str:
    s = run.summary or {}
    classes = s.get("classes") or []
    if not s:
        return ""
    rows = [[_esc("data"), _esc(s.get("data", "—"))], [_esc("classes"), _esc(f"{len(classes)}: " + ", ".join(
        str(c) for c in classes[:40]) + (" ..." if len(classes) > 40 else ""))],
            [_esc("images"), _esc(f"{s.get('train_images', '?')} train, {s.get('val_images', '?')} validation")],
            [_esc("data check"), _leak_text(s)]]
    pairs = s.get("train_val_leak_pairs") or []
    listed = _table(["training image", "its copy in validation"], [[_esc(p.get("train")), _esc(p.get("val"))]
                                                                    for p in pairs]) if pairs else ""
    return "<h2>Data</h2>" + _table(["", ""], rows) + listed


def _leak_text(s: dict[str, Any]) -> str:
    """What training's check for train/val leakage found (exact copies; check-data finds near ones)."""
    if "train_val_leaks" not in s:
        return "<span class=\"missing\">not recorded (a run made before the check)</span>"
    count = s["train_val_leaks"]
    if not count:
        return (f"no validation image is a copy of a training image ({_number('train_val_leaks', count)} leaks; "
                "<code>cnntrain check-data</code> also looks for near copies and duplicates)")
    return (f"<span class=\"missing\">{_number('train_val_leaks', count)} validation image(s) are exact copies of "
            "training images</span>: the validation score is inflated; <code>cnntrain check-data</code> lists "
            "every pair, near copies too")


def _pictures(run: RunRecord) -> str:
    if not run.pictures:
        return "<h2>Pictures</h2><p class=\"missing\">No pictures in this run folder.</p>"
    parts = ["<h2>Pictures</h2>"]
    for name, path in run.pictures.items():
        mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
        try:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except OSError:
            parts.append(f"<p class=\"missing\">{_esc(name)} could not be read.</p>")
            continue
        caption = KNOWN_PICTURES.get(name, name)
        parts.append(f"<figure><img src=\"data:{mime};base64,{data}\" alt=\"{_esc(caption)}\">"
                     f"<figcaption>{_esc(caption)} ({_esc(name)})</figcaption></figure>")
    return "".join(parts)


def _per_class(run: RunRecord) -> str:
    rows = (run.summary or {}).get("per_class")
    if not rows:
        return ""
    header = ["class", "precision", "recall", "F1", "support"]
    body = [[_esc(r.get("class")), *(_cell(r.get(k)) for k in ("precision", "recall", "f1", "support"))]
            for r in rows if isinstance(r, dict)]
    return "<h2>Per class (best weights, validation split)</h2>" + _table(header, body)


def _other_results(run: RunRecord) -> str:
    """Lists of rows and mappings in summary.json that no section above shows."""
    parts = []
    for key, value in (run.summary or {}).items():
        if key in OWN_SECTION:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for row in value for k in row))
            parts.append(f"<h2>{_esc(key.replace('_', ' '))}</h2>"
                         + _table(columns, [[_cell(row.get(c)) for c in columns] for row in value]))
        elif isinstance(value, dict) and value:
            parts.append(f"<h2>{_esc(key.replace('_', ' '))}</h2>"
                         + _table(["", ""], [[_esc(k), _cell(v)] for k, v in value.items()]))
    return "".join(parts)


def _epochs(run: RunRecord) -> str:
    if not run.metrics:
        return ""
    columns = [c for c in run.metrics[0] if any(row.get(c) not in ("", None) for row in run.metrics)]
    rows = [[_cell(_parsed(row.get(c))) for c in columns] for row in run.metrics]
    return "<h2>Epochs (metrics.csv)</h2>" + _table(columns, rows)


def _parsed(text: str | None) -> Any:
    if text in (None, ""):
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def _configuration(run: RunRecord) -> str:
    if not run.config:
        return "<h2>Configuration</h2><p class=\"missing\">No config.yaml in this run folder.</p>"
    rows = [[_esc(k), _esc(json.dumps(v) if isinstance(v, (list, dict)) else "—" if v is None else v)]
            for k, v in run.config.items()]  # as written: a configuration is read to be rerun
    return ("<h2>Configuration (config.yaml: rerun with <code>cnntrain train --config</code>)</h2>"
            + _table(["option", "value"], rows))
