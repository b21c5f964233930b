"""``report.html``: one self-contained page per run folder, for reading a run without the code.

:func:`write_report` builds it from what the run folder already holds (summary.json, config.yaml,
metrics.csv and the pictures), so ``cnntrain report RUN`` can (re)write it for any run, finished,
interrupted or made before the page existed. :mod:`cnntrain.report.page` holds the sections.
"""

from cnntrain.report.page import REPORT_NAME, build_report, write_report

__all__ = ["REPORT_NAME", "build_report", "write_report"]
