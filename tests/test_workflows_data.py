"""A new user's workflows (issue 17): a recipe on one's own folder, eval on a test set that
holds only some of the classes, a frozen random backbone, and architecture names as typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnntrain.cli import app
from cnntrain.config import build_config, load_yaml
from cnntrain.errors import UsageError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
TINY = ["--arch", "squeezenet1_1", "--no-pretrained", "--img-size", "32", "--batch-size", "4", "--workers", "0",
        "--epochs", "1", "--device", "cpu", "--quiet"]


# --- item 4: command-line data wins over the recipe's -------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_runs_on_ones_own_folder(path, tmp_path):
    cfg = build_config(load_yaml(path), {"data_path": str(tmp_path)}, source=str(path))
    assert cfg.data_path == str(tmp_path) and cfg.dataset is None
    assert cfg.arch == load_yaml(path)["arch"]  # the rest of the recipe still applies
    assert all(getattr(cfg, key) == value for key, value in load_yaml(path).items() if key != "dataset")


def test_command_line_dataset_replaces_the_files_data_path(tmp_path):
    cfg = build_config({"data_path": str(tmp_path), "epochs": 3}, {"dataset": "shapes"})
    assert (cfg.dataset, cfg.data_path, cfg.epochs) == ("shapes", None, 3)


@pytest.mark.parametrize("layer", ["file", "overrides"])
def test_data_path_and_dataset_in_one_layer_is_still_an_error(layer, tmp_path):
    both = {"data_path": str(tmp_path), "dataset": "shapes"}
    with pytest.raises(UsageError, match="not both"):
        build_config(both, {}) if layer == "file" else build_config({"dataset": "flowers"}, both)


# --- item 6: eval on a subset of the checkpoint's classes ---------------------------------------


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    """squeezenet1_1 trained 1 epoch on blue/green/red, the arch typed in mixed case."""
    from conftest import make_image_folder
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("subset")
    data = make_image_folder(root / "data", per_class=6, size=24)
    args = ["train", "--data-path", str(data), *TINY, "--project", str(root / "runs")]
    args[args.index("squeezenet1_1")] = "SqueezeNet1_1"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "runs" / "exp" / "best.pt"


@pytest.mark.integration
def test_a_mixed_case_arch_trains_and_the_run_records_the_registered_name(three_class_run):
    from cnntrain import checkpoint

    ckpt = checkpoint.load(three_class_run)
    assert ckpt["arch"] == "squeezenet1_1" and ckpt["config"]["arch"] == "squeezenet1_1"


@pytest.mark.integration
def test_eval_scores_a_folder_with_some_of_the_checkpoints_classes(three_class_run, runner, tmp_path):
    """blue and red only: red is label 1 in the folder but class 2 of the checkpoint."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "test", per_class=4, size=24, classes=("blue", "red"), seed=7)
    result = runner.invoke(app, ["eval", "--weights", str(three_class_run), "--data-path", str(data), "--split", "all",
                                 "--format", "json", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    result = runner.invoke(app, ["predict", str(data), "--weights", str(three_class_run), "--format", "json",
                                 "--topk", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    classes = ["blue", "green", "red"]
    assert report["classes"] == classes
    by_hand = [[0] * 3 for _ in classes]
    for r in rows:
        by_hand[classes.index(Path(r["path"]).parent.name)][classes.index(r["predictions"][0]["class"])] += 1
    hits = sum(by_hand[i][i] for i in range(3))
    assert report["images"] == len(rows) == 8
    assert report["top1"] == pytest.approx(hits / 8)
    assert report["confusion_matrix"] == by_hand  # over all the checkpoint's classes, green's row empty
    assert [r["class"] for r in report["per_class"]] == ["blue", "red"]
    assert [r["support"] for r in report["per_class"]] == [4, 4]
    assert report["absent_classes"] == ["green"]
    assert report["macro_f1"] == pytest.approx(sum(r["f1"] for r in report["per_class"]) / 2)
    table = runner.invoke(app, ["eval", "--weights", str(three_class_run), "--data-path", str(data), "--split", "all",
                                "--workers", "0", "--device", "cpu"])
    assert table.exit_code == 0, table.output
    assert "no images of green" in table.stdout


@pytest.mark.integration
def test_eval_refuses_a_class_the_checkpoint_does_not_know(three_class_run, runner, tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "test", per_class=2, size=24, classes=("blue", "violet"))
    result = runner.invoke(app, ["eval", "--weights", str(three_class_run), "--data-path", str(data), "--split", "all",
                                 "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "violet" in line and "blue" not in line.split("(")[0]
    assert "only in the checkpoint" not in line  # the missing green and red are no problem


# --- item 7: a frozen random backbone ------------------------------------------------------------


def _warnings(tmp_path, **kw) -> list[str]:
    from cnntrain.train.run_model import build_run_model

    said: list[str] = []
    build_run_model(kw.pop("arch", "squeezenet1_1"), 3, pretrained=kw.pop("pretrained", False),
                    weights=kw.pop("weights", None), resumed=kw.pop("resumed", None), warn=said.append, **kw)
    return said


def test_freezing_a_random_backbone_warns(tmp_path):
    (line,) = _warnings(tmp_path, freeze_layers=True)
    assert "--freeze-layers" in line and "pretrained" in line and "\n" not in line
    # an architecture without ImageNet weights starts random too
    assert len(_warnings(tmp_path, arch="shufflenet_v1_g1", pretrained=None, freeze_layers=True)) == 1


def test_no_frozen_backbone_warning_when_weights_come_from_somewhere(tmp_path):
    from cnntrain import checkpoint
    from cnntrain.models import get_model

    model = get_model("squeezenet1_1", num_classes=3)
    weights = checkpoint.save(tmp_path / "start.pt", checkpoint.make_checkpoint(
        model, arch="squeezenet1_1", classes=["a", "b", "c"], img_size=32, mean=[0.5] * 3, std=[0.25] * 3,
        config={}, epoch=1, metrics={}))
    assert _warnings(tmp_path, freeze_layers=True, weights=str(weights)) == []
    assert _warnings(tmp_path, freeze_layers=True, resumed={"model": model.state_dict()}) == []
    assert _warnings(tmp_path, freeze_layers=False) == []


@pytest.mark.integration
def test_train_warns_about_a_frozen_random_backbone_even_when_quiet(runner, tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=6, size=24)
    result = runner.invoke(app, ["train", "--data-path", str(data), *TINY, "--freeze-layers",
                                 "--project", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "frozen, randomly initialised backbone" in result.output


# --- item 12: architecture names --------------------------------------------------------------------


def test_unknown_arch_fails_before_any_data_is_read(runner, tmp_path):
    result = runner.invoke(app, ["train", "--arch", "nosuchnet", "--data-path", str(tmp_path / "missing"),
                                 "--project", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "unknown architecture 'nosuchnet'" in result.stderr and "missing" not in result.stderr


def test_arch_names_match_case_insensitively():
    from cnntrain.models import get_spec

    assert get_spec("ResNet18").name == "resnet18"
    assert get_spec("SHUFFLENET_V2_X1_0").name == "shufflenet_v2_x1_0"


@pytest.mark.parametrize("typed, suggested", [
    ("shufflenetv2", "shufflenet_v2_x1_0"),
    ("resnet-18", "resnet18"),
    ("seresnet50", "se_resnet50"),
    ("EfficientNetB0", "efficientnet_b0"),
    ("resnt50", "resnet50"),
])
def test_near_miss_arch_names_are_suggested(typed, suggested):
    from cnntrain.models import get_spec

    with pytest.raises(UsageError, match="did you mean") as info:
        get_spec(typed)
    first = str(info.value).split("did you mean: ")[1].split("?")[0].split(", ")
    assert suggested in first, str(info.value)
    if typed.replace("-", "").lower() == suggested.replace("_", ""):
        assert first[0] == suggested  # the same name but for separators comes first



def test_no_quiet_overrides_a_recipe_that_asks_for_quiet(config_of, tmp_path):
    """A recipe (or any config) with quiet: true can be overridden from the command line."""
    recipe = tmp_path / "quiet.yaml"
    recipe.write_text("quiet: true\n", encoding="utf-8")
    for flags, expected in (([], True), (["--no-quiet"], False), (["-q"], True)):
        assert config_of("--config", str(recipe), *flags).quiet is expected, flags


def test_bare_train_runs_offline_on_shapes_at_its_own_size_from_scratch(config_of, tmp_path):
    """No data named: `shapes`, 64 px, no ImageNet weights to download, as scripts/demo.sh runs it."""
    bare = config_of()
    assert (bare.dataset, bare.img_size, bare.pretrained, bare.epochs) == (None, 64, False, 6)
    assert config_of("--dataset", "shapes").img_size == 64
    assert config_of("--img-size", "96", "--pretrained").img_size == 96  # options still win
    assert config_of("--dataset", "shapes", "--pretrained").pretrained is True
    own = config_of("--data-path", str(tmp_path))  # one's own photos keep the general defaults
    assert (own.img_size, own.pretrained, own.epochs) == (224, None, 10)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("img_size: 128\n", encoding="utf-8")
    assert config_of("--config", str(recipe)).img_size == 128


def _hand_made_checkpoint(path: Path, config: dict | None) -> Path:
    """A self-describing checkpoint of an untrained 3-class model: no training needed."""
    from cnntrain import checkpoint
    from cnntrain.models import get_model

    model = get_model("squeezenet1_1", num_classes=3)
    payload = checkpoint.make_checkpoint(model, arch="squeezenet1_1", classes=["blue", "green", "red"], img_size=32,
                                         mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], config=config or {},
                                         epoch=1, metrics={})
    return checkpoint.save(path, payload)


def test_eval_without_data_options_scores_the_data_the_checkpoint_was_trained_on(runner, tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=4, size=24)
    ckpt = _hand_made_checkpoint(tmp_path / "best.pt", {"data_path": str(data), "seed": 0, "val_split": 0.25})
    args = ["eval", "--weights", str(ckpt), "--format", "json", "--workers", "0", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 3 and str(data) in report["data"]  # one held-out image per class
    assert "the data" in result.stderr and str(data) in result.stderr

    import shutil

    shutil.rmtree(data)
    gone = runner.invoke(app, args)
    assert gone.exit_code == 2 and "not there any more" in gone.stderr and "--data-path" in gone.stderr


def test_eval_of_a_checkpoint_that_does_not_say_its_data_asks_for_it(runner, tmp_path):
    ckpt = _hand_made_checkpoint(tmp_path / "best.pt", None)
    result = runner.invoke(app, ["eval", "--weights", str(ckpt), "--device", "cpu"])
    assert result.exit_code == 2 and "does not say what it was trained on" in result.stderr
