"""The command line itself: entry points, help, errors and exit codes, `models`, `download-weights`."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch

from cnntrain import __version__, choices, weights
from cnntrain.cli import app


@pytest.mark.integration
def test_version_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "cnntrain", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"cnntrain {__version__}"


def test_help_lists_commands(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "predict", "eval", "export", "bench", "download-weights", "models"):
        assert command in result.output


@pytest.mark.parametrize("argv", [["train", "--arch", "resnet5"], ["download-weights", "resnt50"]])
def test_unknown_arch_exit_2_with_suggestions(runner, argv):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "did you mean:" in line and "resnet50" in line


def test_models_json(runner):
    result = runner.invoke(app, ["models", "resnet*", "--format", "json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
    r50 = rows["resnet50"]
    assert r50["params_m"] == pytest.approx(25.557, abs=0.01)
    assert r50["gmacs"] == pytest.approx(4.09, abs=0.05)
    assert r50["pretrained"] and r50["top1"] == pytest.approx(80.858) and r50["source"] == "torchvision"


def test_models_csv_has_a_header_and_a_line_per_architecture(runner):
    result = runner.invoke(app, ["models", "resnet*", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["name"] for r in rows] == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert float(rows[2]["params_m"]) == pytest.approx(25.557, abs=0.01) and rows[2]["source"] == "torchvision"


def test_models_table_and_no_match(runner):
    result = runner.invoke(app, ["models", "shufflenet_v1*"])
    assert result.exit_code == 0 and "shufflenet_v1_g3" in result.stdout and "cnntrain" in result.stdout
    result = runner.invoke(app, ["models", "nothing-like-this"])
    assert result.exit_code == 1 and "no architecture matches" in result.stderr


def test_bad_option_value_is_usage_error(runner):
    result = runner.invoke(app, ["models", "--format", "xml"])
    assert result.exit_code == 2 and "--format" in result.stderr
    # checked before a checkpoint or any data is looked for (there is neither here)
    result = runner.invoke(app, ["eval", "--batch-size", "0", "--weights", "nowhere.pt"])
    assert result.exit_code == 2 and "--batch-size must be at least 1" in result.stderr


# --- download-weights through the CLI, against the loopback server -----------------------


def _payload() -> tuple[bytes, str]:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    data = buf.getvalue()
    return data, f"tiny-{hashlib.sha256(data).hexdigest()[:8]}.pth"


@pytest.mark.timeout(60)
def test_download_weights_url_good_then_list(runner, server):
    data, name = _payload()
    url = server.add(name, data)
    result = runner.invoke(app, ["download-weights", "--url", url])
    assert result.exit_code == 0, result.output
    assert (weights.cache_dir() / name).read_bytes() == data
    listing = runner.invoke(app, ["download-weights", "--list"])
    assert name in listing.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["truncated", "wrong_hash", "stall_headers", "refused"])
def test_download_weights_failures_leave_cache_clean(runner, server, closed_port, kind):
    data, name = _payload()
    if kind == "refused":
        url = f"http://127.0.0.1:{closed_port}/{name}"
    elif kind == "wrong_hash":
        url = server.add(name, data + b"tampered")
    else:
        url = server.add(name, data, kind=kind)
    result = runner.invoke(app, ["download-weights", "--url", url, "--timeout", "0.5"])
    assert result.exit_code != 0
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    cache = weights.cache_dir()
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.timeout(60)
def test_download_weights_mirror_hash_mismatch(runner, server):
    """A mirror serving a file that does not match the hash in torchvision's name is refused."""
    from cnntrain.models import get_spec

    name = weights.file_name(get_spec("resnet18").weights)
    server.add(name, b"not the real weights")
    result = runner.invoke(app, ["download-weights", "resnet18", "--mirror", server.mirror, "--timeout", "2"])
    assert result.exit_code != 0 and "hash" in result.stderr.lower()
    cache = weights.cache_dir()
    assert not cache.exists() or not any(cache.iterdir())


def test_download_weights_from_file(runner, tmp_path):
    data, name = _payload()
    src = tmp_path / name
    src.write_bytes(data)
    result = runner.invoke(app, ["download-weights", "--from", str(src)])
    # no architecture looks for tiny-*.pth: refused, not cached where nothing would find it (issue 17)
    assert result.exit_code == 2 and "--arch NAME" in result.stderr, result.output
    assert not (weights.cache_dir() / name).exists()


def test_train_without_cached_weights_names_three_ways_out(runner, closed_port, monkeypatch, image_folder, tmp_path):
    monkeypatch.setenv("CNNTRAIN_WEIGHTS_MIRROR", f"http://127.0.0.1:{closed_port}")
    result = runner.invoke(app, ["train", "--data-path", str(image_folder), "--arch", "resnet18", "--epochs", "1",
                                 "--project", str(tmp_path), "--workers", "0"])
    assert result.exit_code == 1
    for way in ("cnntrain download-weights resnet18", "--weights", "--no-pretrained"):
        assert way in result.stderr


def test_models_stats_are_cached(runner, monkeypatch):
    from cnntrain.models import stats

    first = runner.invoke(app, ["models", "resnet1*", "--format", "json"])
    assert first.exit_code == 0

    def no_recount(*a, **k):
        raise AssertionError("counted again")

    monkeypatch.setattr(stats, "model_stats", no_recount)
    second = runner.invoke(app, ["models", "resnet1*", "--format", "json"])
    assert second.exit_code == 0 and json.loads(second.stdout) == json.loads(first.stdout)


def _options(command: str) -> dict[str, str]:
    """Help text of each option of ``command``, by parameter name."""
    import typer

    return {p.name: getattr(p, "help", None) or "" for p in typer.main.get_command(app).commands[command].params}


def _rendered_help(runner, command: str) -> str:
    """``cnntrain COMMAND --help`` as shown, boxes and line wrapping taken out."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_train_help_shows_each_default_of_trainconfig(runner):
    """Every TrainConfig field is an option of `train`, and the help shows the default the code has
    (rich markup would swallow '[default: ...]', so the help says '(default: ...)' itself)."""
    from cnntrain.config import TrainConfig

    options, rendered = _options("train"), _rendered_help(runner, "train")
    # spelt `--lr auto`, `--batch-size auto`
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name not in ("lr_auto", "batch_size_auto")]
    assert {f.name for f in fields} <= set(options)
    with_defaults = [f for f in fields if f.default is not None and f.default is not dataclasses.MISSING]
    assert len(with_defaults) > 20
    for f in with_defaults:
        text = f"(default: {_shown(f.default)})"
        assert text in options[f.name], (f.name, options[f.name])
        assert text in rendered, text


@pytest.mark.parametrize("command, option, allowed", [
    ("train", "opt", choices.OPTIMIZERS),
    ("train", "sched", choices.SCHEDULES),
    ("train", "aug", choices.AUGMENTATIONS),
    ("train", "cache", choices.CACHE_MODES),
    ("train", "lr_scale", choices.LR_SCALES),
    ("train", "sampler", choices.SAMPLERS),
    ("train", "class_weights", choices.CLASS_WEIGHT_MODES),
    ("lr-find", "fmt", choices.LR_FIND_FORMATS),
    ("models", "fmt", choices.MODELS_FORMATS),
    ("predict", "fmt", choices.PREDICT_FORMATS),
    ("eval", "fmt", choices.EVAL_FORMATS),
    ("eval", "split", choices.EVAL_SPLITS),
    ("bench", "fmt", choices.BENCH_FORMATS),
    ("bench", "cache", choices.CACHE_MODES),
    ("export", "fmt", choices.EXPORT_FORMATS),
])
def test_help_lists_each_choice(runner, command, option, allowed):
    """Choices in help texts come from cnntrain.choices, so a new one shows up without a help edit."""
    text = _options(command)[option]
    for choice in allowed:
        assert re.search(rf"(?<![\w-]){re.escape(choice)}(?![\w-])", text), (option, choice, text)
    assert " ".join(text.split()) in _rendered_help(runner, command)
