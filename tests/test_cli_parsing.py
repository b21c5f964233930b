"""How the command line is parsed: the tutorials' `--flag False`, one-line usage errors, tidy help."""

from __future__ import annotations

import pytest

from cnntrain.cli import app


@pytest.mark.parametrize("spelling, expected", [
    (["--freeze-layers", "False"], False),
    (["--freeze-layers", "True"], True),
    (["--freeze-layers=false"], False),
    (["--freeze-layers=yes"], True),
    (["--no-freeze-layers", "false"], True),
])
def test_boolean_flags_take_the_tutorials_true_false(config_of, spelling, expected):
    cfg = config_of("--dataset", "shapes", "--freeze-layers", *spelling)
    assert cfg.freeze_layers is expected


def test_false_for_a_flag_without_a_no_form_leaves_it_off(config_of):
    cfg = config_of("--dataset", "shapes", "--exist-ok", "False", "--amp", "off", "--epochs", "3")
    assert cfg.exist_ok is False and cfg.amp is False and cfg.epochs == 3


@pytest.mark.parametrize("argv, says", [
    (["train", "--bogus"], "No such option: --bogus"),
    (["train", "--epochs", "many"], "'--epochs'"),
    (["predict"], "Missing argument 'IMAGE'"),
    (["train", "--freeze-layers", "maybe"], "unexpected extra argument"),
    (["nonsense"], "No such command"),
])
def test_typer_usage_errors_are_one_line_exit_2(runner, argv, says):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "╭" not in line and line.startswith("error:"), result.stderr
    assert says in line and "--help" in line


def test_help_shows_no_typer_type_names_for_flags_and_arguments(runner):
    for command in ("train", "predict", "download-weights", "models"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in text and "<list[str]>" not in text and "{" not in text, text
    usage = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output
    assert "cnntrain predict [OPTIONS] IMAGE..." in usage


def test_an_image_size_the_architecture_cannot_take_is_refused_before_the_data_is_read(runner, tmp_path):
    result = runner.invoke(app, ["train", "--arch", "vit_b_16", "--img-size", "64", "--no-pretrained",
                                 "--data-path", str(tmp_path), "--project", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "vit_b_16 takes images of at least 224 px" in result.output and "--img-size 224" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["train", "--data-path", ""], ["train", "--data="], ["eval", "--weights", " "],
                                  ["predict", "x.jpg", "--weights", ""]])
def test_an_empty_path_is_a_usage_error_not_the_current_folder(runner, argv):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "is empty (an unset shell variable?)" in line, result.stderr
