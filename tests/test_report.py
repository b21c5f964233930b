"""report.html: written by every run, rewritten by `cnntrain report`, checked in a real browser.

The browser is Debian's chromium (scripts/test.sh installs it when missing), driven through
Playwright with that executable: the page must load with no console error and no request for
anything outside the file, every picture must decode to a non-zero size, and every number that
carries a summary.json key must equal summary.json's value.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cnntrain.cli import app
from cnntrain.report import build_report

TINY = ["--arch", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--val-split", "0.25", "--epochs", "2"]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


@pytest.fixture(scope="module")
def run(tmp_path_factory, image_folder) -> Path:
    from typer.testing import CliRunner

    project = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, ["train", "--data-path", str(image_folder), *TINY, "--project", str(project)])
    assert result.exit_code == 0, result.output
    return project / "exp"


@pytest.mark.integration
def test_every_run_writes_a_self_contained_report(run):
    page = (run / "report.html").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert "report.html" in summary["files"] and summary["per_class"][0]["class"] == "blue"
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing fetched
    assert page.count("<img src=\"data:image/png;base64,") >= 2  # learning curves, confusion matrix
    for row in summary["per_class"]:
        assert f"<td>{row['class']}</td>" in page
    assert summary["train_val_leaks"] == 0 and "no validation image is a copy of a training image" in page


@pytest.mark.integration
def test_report_command_rewrites_it_also_for_an_interrupted_or_older_run(run, runner, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "report.html").unlink()
    (old / "summary.json").unlink()  # as a run stopped before its end, or made before summaries
    (old / "top_losses.png").write_bytes((run / "learning_curves.png").read_bytes())  # a picture of a later feature
    result = runner.invoke(app, ["report", str(old)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {old / 'report.html'}"
    page = (old / "report.html").read_text()
    assert "not finished (no summary.json)" in page and "the validation images with the highest loss" in page
    assert "Epochs (metrics.csv)" in page and "Configuration" in page


def test_report_of_something_that_is_not_a_run_is_one_line(runner, tmp_path):
    for target, says in ((tmp_path / "nope", "is not a folder"), (tmp_path, "is not a run folder")):
        result = runner.invoke(app, ["report", str(target)])
        assert result.exit_code == 2 and says in result.output and len(result.output.strip().splitlines()) == 1


def test_summary_keys_of_later_features_appear_without_changes(tmp_path):
    summary = {"arch": "resnet18", "best_val_acc": 0.5, "ece_after": 0.0312345,
               "most_confused": [{"true": "cat", "predicted": "dog", "count": 3}], "calibration": {"temperature": 1.7}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = build_report(tmp_path)
    assert 'data-key="ece_after" data-value="0.0312345">0.0312<' in page
    assert "<h2>most confused</h2>" in page and "<td>dog</td>" in page and "1.7000" in page
    assert "not recorded (a run made before the check)" in page
    summary.update(train_val_leaks=1, train_val_leak_pairs=[{"train": "a/cat/1.jpg", "val": "a/cat/1 copy.jpg"}])
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = build_report(tmp_path)
    assert "validation image(s) are exact copies of training images" in page and "<td>a/cat/1 copy.jpg</td>" in page


CHECK_PAGE = """() => {
  const imgs = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0,
                                               alt: i.alt}));
  const numbers = [...document.querySelectorAll('[data-key]')].map(e => ({key: e.dataset.key,
                                                                          value: e.dataset.value,
                                                                          text: e.textContent}));
  return {imgs, numbers, title: document.title};
}"""


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test.sh installs it with apt-get)")
def test_report_in_a_real_browser(run):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    summary = json.loads((run / "summary.json").read_text())
    problems: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in (
                "error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: None if r.url.startswith(("file://", "data:")) else problems.append(
                f"fetched {r.url}"))
            page.goto((run / "report.html").resolve().as_uri(), wait_until="load")
            seen = page.evaluate(CHECK_PAGE)
        finally:
            browser.close()
    assert problems == []
    assert seen["title"] == f"cnntrain run {run.name}"
    assert len(seen["imgs"]) >= 2 and all(i["ok"] for i in seen["imgs"]), seen["imgs"]
    assert seen["numbers"], "no number on the page carries its summary.json key"
    for number in seen["numbers"]:
        assert json.loads(number["value"]) == summary[number["key"]], number
    shown = {n["key"]: n["text"] for n in seen["numbers"]}
    assert shown["best_val_acc"] == f"{summary['best_val_acc']:.4f}"
    assert shown["train_images"] == str(summary["train_images"])
