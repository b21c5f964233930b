"""`cnntrain train` with bad arguments: whatever the options and the recipe say, the outcome is a run
that starts, or exit code 1 or 2 with one line saying why; never a traceback.

First every option alone with each odd value of its kind (numbers out of range and of the wrong
type, unknown names, empty strings, odd paths); then Hypothesis draws combinations of options
and YAML recipes (wrong types, nesting, unknown keys, documents that are not mappings).
Everything up to the model is real: parsing, the recipe, validation, the resume plan, the output
folder check, the device, the architecture's name, the data folder and its scan. Where the
arguments are valid the run stops as the model would be built, so no example trains.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import traceback
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import typer.main
import typer.testing
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnntrain.choices import AUG_PRESETS, AUGMENTATIONS, CACHE_MODES, LR_SCALES, OPTIMIZERS, SAMPLERS, SCHEDULES
from cnntrain.cli import app
from cnntrain.config import FIELDS

FIT = importlib.import_module("cnntrain.train.fit")  # the module: `cnntrain.train.fit` names the function
CHECKS = settings(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class ReachedTheModel(Exception):
    """The arguments were good: the run got as far as building its model."""


# --- what the examples are made of --------------------------------------------------------

# Odd values of each kind, tried one by one and drawn from by the properties. "@name" is a
# prepared place (see ``places``): a good folder, a file, an empty folder, a symlink loop...
WHOLE_VALUES = ["0", "-1", "999999999999999999", str(2**64), "1.5"]
REAL_VALUES = ["nan", "-inf", "-1", "0", "1e308", "0x10"]
# Not "/" or "~": a data folder there is legal and walks the whole machine.
PATH_VALUES = ["@data", "@file", "@empty", "@no_classes", "@one_class", "@odd name", "@loop", "@data/a/0.png",
               "", ".", "-", "/dev/null", "/proc/version", "nowhere/deep", "a" * 300, "b/" * 3000, "caf\udce9",
               "new\nline", "ünï cödé"]
ODD_WORDS = ["", "NONE", "x,y", "ünï"]
CHOICES = {"--opt": OPTIMIZERS, "--sched": SCHEDULES,
           "--aug": (*AUGMENTATIONS, "trivialaugment,erasing", "none,randaugment"),
           "--aug-preset": tuple(AUG_PRESETS), "--cache": CACHE_MODES, "--sampler": SAMPLERS, "--lr-scale": LR_SCALES,
           "--class-weights": ("none", "auto", *PATH_VALUES),
           "--device": ("auto", "cpu", "cuda", "cuda:1", "mps", "cpu:0", "meta", "xla", "gpu", "cuda:-1"),
           "--arch": ("resnet18", "mobilenet_v3_small", "ResNet18", "resnet", "timm/", "se_resnet50"),
           "--dataset": ("flowerz", "cifar", "imagenet"),  # the built-ins download or generate: tested elsewhere
           "--crop-scale": ("0.5,1", "1,0.5", "0,0", "0.2,0.4,0.6", ",", "nan,1", "0.5"),
           "--crop-ratio": ("0.75,1.33", "2,1", "-1,1", "inf,1"),
           "--milestones": ("3,6", "6,3", "0", "-2,5", "1.5"),
           "--batch-size": ("auto", "AUTO", "2.5", *WHOLE_VALUES), "--lr": ("auto", "Auto ", *REAL_VALUES),
           "--nproc": ("1", "0", "-1", "x"),  # 2 or more would launch real processes
           "--name": ("exp", "latest", "a/b", "..", "x" * 300, *PATH_VALUES),
           "--resume": ("auto", *PATH_VALUES)}
INT_OPTIONS = ("--img-size", "--workers", "--unfreeze-epoch", "--epochs", "--step-size", "--warmup-epochs",
               "--patience", "--seed")
FLOAT_OPTIONS = ("--val-split", "--hflip", "--vflip", "--rotate", "--color-jitter", "--cache-max-gb", "--momentum",
                 "--weight-decay", "--gamma", "--lrf", "--label-smoothing", "--mixup", "--cutmix", "--mix-switch-prob",
                 "--ema-decay", "--backbone-lr-mult", "--clip-grad")
PATH_OPTIONS = ("--data-path", "--weights", "--project", "--config")
VALUES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(INT_OPTIONS, tuple(WHOLE_VALUES)), **dict.fromkeys(FLOAT_OPTIONS, tuple(REAL_VALUES)),
    **dict.fromkeys(PATH_OPTIONS, tuple(PATH_VALUES)),
    **{name: (*choices, *ODD_WORDS) for name, choices in CHOICES.items()},
}
FLAGS = ["--pretrained", "--no-pretrained", "--freeze-layers", "--strict", "--gpu-decode", "--feature-cache",
         "--no-nesterov", "--ema", "--amp", "--compile", "--sync-bn", "--deterministic", "--exist-ok", "--quiet",
         "--freeze-layers=yes", "--ema=off", "--amp=maybe", "--bogus-option", "-x", "extra-argument"]

_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=8)
_NUMBERS = st.one_of(st.integers(-(10**6), 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))
# An option with one of its odd values, a number of any size or a short text; or an on/off flag.
OPTION = st.sampled_from(sorted(VALUES)).flatmap(
    lambda name: st.tuples(st.just(name), st.one_of(st.sampled_from(VALUES[name]), _NUMBERS, _TEXT)))
ARGUMENTS = st.lists(st.one_of(OPTION, st.sampled_from(FLAGS).map(lambda flag: (flag,))), max_size=4)

_KEYS = st.one_of(st.sampled_from(sorted(FIELDS)), st.sampled_from(["batch-size", "img-size", "data-path"]),
                  st.sampled_from(["", "lr ", "Epochs", "nope", "learning_rate"]), st.integers(-3, 3), st.none())
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(),
                     st.text(max_size=8), st.sampled_from(["auto", "@data", "@file", "a\0b", "1e-4", "10", "none"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=4), inner, max_size=2)),
                       max_leaves=6)
RECIPES = st.dictionaries(_KEYS, _VALUES, max_size=5)
NOT_MAPPINGS = st.sampled_from(["", "- a\n- b\n", "just words", "{", "a: [1,", "epochs: 1\nepochs: 2\n",
                                "!!python/object/apply:os.system ['true']", "&a [*a]", "\t: x", "---\n...\n",
                                "lr: !!binary aGVsbG8=", "\x00\x01\x02"])


# --- running one example ------------------------------------------------------------------


@pytest.fixture
def places(tmp_path_factory, tmp_path, monkeypatch) -> dict[str, Path]:
    """The prepared places "@name" stands for, a working folder without runs, and `train` that
    stops where the model would be built. One set for every example of a test (that is the point
    of a property test); what an example may change (the caches) is a cache, not a result."""
    root = tmp_path_factory.mktemp("places")
    data = root / "data"
    for label, name in enumerate(("a", "b")):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (90 * label, 40 * i, 60)).save(data / name / f"{i}.png")
    (root / "file").write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "no_classes").mkdir()
    Image.new("RGB", (16, 16)).save(root / "no_classes" / "loose.png")
    (root / "one_class" / "only").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "one_class" / "only" / "0.png")
    (root / "odd name").mkdir()
    (root / "loop").symlink_to(root / "loop")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # `runs` and `--resume auto` look here, not in the repository

    def stop(*args, **kwargs):
        raise ReachedTheModel

    monkeypatch.setattr(FIT, "build_run_model", stop)
    # Building the command from the function signatures is most of an invocation's time; it never changes.
    monkeypatch.setattr(typer.testing, "_get_command", functools.lru_cache(maxsize=None)(typer.main.get_command))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # --deterministic sets it; restored after
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield {"@" + p.name: p for p in root.iterdir()} | {"@data/a/0.png": data / "a" / "0.png"}
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, False


def resolve(value: str, places: dict[str, Path]) -> str:
    return str(places[value]) if value in places else value


def check_outcome(argv: list[str]) -> str:
    """Run ``cnntrain train ARGV`` in this process: ``valid`` (it reached the model), ``exit N``,
    or ``BROKEN: ...`` saying what went wrong (a traceback, another code, not one line)."""
    result = typer.testing.CliRunner().invoke(app, ["train", *argv])
    if isinstance(result.exception, ReachedTheModel):
        return "valid"
    if not isinstance(result.exception, (SystemExit, type(None))):
        return "BROKEN: raised " + "".join(traceback.format_exception(result.exception, limit=-4))
    if result.exit_code not in (0, 1, 2):
        return f"BROKEN: exit code {result.exit_code}: {result.output}"
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    if result.exit_code and not (len(errors) == 1 and errors[0].startswith("error: ")):
        return f"BROKEN: not one error line: {result.stderr!r}"
    return f"exit {result.exit_code}"


def with_data(argv: list[str], places: dict[str, Path]) -> list[str]:
    """Give the run the small folder unless the example names its data: without any, `train` would
    generate the built-in `shapes` dataset, which is tested elsewhere and costs seconds here."""
    named = any(word in ("--data-path", "--data", "--dataset", "--resume", "--config") for word in argv)
    return argv if named else [*argv, "--data-path", str(places["@data"])]


# --- the tests ----------------------------------------------------------------------------

OPTION_EXAMPLES, RECIPE_EXAMPLES = 200, 120


def test_every_option_alone_with_each_odd_value_starts_a_run_or_fails_in_one_line(places):
    tried = [(name, value) for name in sorted(VALUES) for value in VALUES[name]] + [(flag,) for flag in FLAGS]
    outcomes = {}
    for option in tried:
        outcomes[option] = check_outcome(with_data([resolve(word, places) for word in option], places))
    problems = [f"{option}: {outcome}" for option, outcome in outcomes.items() if outcome.startswith("BROKEN")]
    assert not problems, "\n".join(problems)
    assert {"valid", "exit 1", "exit 2"} <= set(outcomes.values())
    assert len(tried) >= 350  # the README's table quotes this count


@settings(CHECKS, max_examples=OPTION_EXAMPLES)
@given(arguments=ARGUMENTS)
def options_hold(places, seen, arguments):
    argv = [resolve(word, places) for option in arguments for word in option]
    outcome = check_outcome(with_data(argv, places))
    assert not outcome.startswith("BROKEN"), (argv, outcome)
    seen.add(outcome)


@settings(CHECKS, max_examples=RECIPE_EXAMPLES)
@given(recipe=RECIPES, raw=st.one_of(st.none(), NOT_MAPPINGS))
def recipes_hold(places, seen, folder, recipe, raw):
    recipe = {key: resolve(value, places) if isinstance(value, str) else value for key, value in recipe.items()}
    path = folder / "recipe.yaml"
    if raw is None:
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    else:
        path.write_bytes(raw.encode("utf-8", "surrogatepass"))
    data = [recipe[key] for key in ("data_path", "data-path", "dataset", "resume") if key in recipe and raw is None]
    argv = ["--config", str(path)]
    outcome = check_outcome(argv if any(v is not None for v in data) else [*argv, "--data-path", str(places["@data"])])
    assert not outcome.startswith("BROKEN"), (recipe, raw, outcome)
    seen.add(outcome)


# Past the point the CLI tests stop at: the options the optimiser and the schedule take, with the
# optimisers and schedules each one matters to.
SCHEDULED = {"lr": (REAL_VALUES + ["0.1", "1e4", "1e5"], OPTIMIZERS, ["cosine"]),
             "momentum": (REAL_VALUES + ["0.9", "1.5"], ["sgd"], ["cosine"]),
             "weight_decay": (REAL_VALUES + ["0.05", "1e4"], OPTIMIZERS, ["cosine"]),
             "backbone_lr_mult": (REAL_VALUES + ["0.1", "1e4"], OPTIMIZERS, ["cosine"]),
             "gamma": (REAL_VALUES + ["0.5", "1", "1.5"], ["sgd"], ["step", "multistep"]),
             "lrf": (REAL_VALUES + ["0.1", "2"], ["sgd"], ["cosine"]),
             "step_size": (WHOLE_VALUES + ["2"], ["sgd"], ["step"]),
             "warmup_epochs": (WHOLE_VALUES + ["2"], ["sgd"], SCHEDULES),
             "milestones": (["3,6", "6,3", "0", "-2,5"], ["sgd"], ["multistep"]),
             "epochs": (["1", "3", "999999999999999999"], ["sgd"], SCHEDULES)}


def test_every_optimiser_and_schedule_setting_the_config_accepts_builds_and_steps():
    """Whatever value `TrainConfig.validate` lets through, the optimiser builds with it and the
    schedule gives finite, non-negative rates for the first epochs: a value they cannot take must
    be a usage error up front, not a traceback at the first step (--lr 1e300, --step-size 0 were)."""
    from cnntrain.config import build_config
    from cnntrain.errors import UsageError
    from cnntrain.train.optim import OptimizerSettings, ScheduleSettings, build_optimizer, build_scheduler

    model = nn.Sequential(OrderedDict(body=nn.Conv2d(3, 2, 3), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
                                      fc=nn.Linear(2, 2)))
    accepted = refused = 0
    for key, (values, optimisers, schedules) in SCHEDULED.items():
        for value, opt, sched in itertools.product(values, optimisers, schedules):
            try:
                cfg = build_config({}, {"milestones": "2,4", key: value, "opt": opt, "sched": sched, "data_path": "."})
            except UsageError:
                refused += 1
                continue
            optimizer = build_optimizer(model, cfg.pick(OptimizerSettings), head="fc")
            schedule = build_scheduler(optimizer, cfg.pick(ScheduleSettings))
            for _ in range(min(cfg.epochs, 3)):
                optimizer.zero_grad()
                model(torch.ones(1, 3, 4, 4)).sum().backward()
                optimizer.step()
                schedule.step()
                rates = [group["lr"] for group in optimizer.param_groups]
                assert all(math.isfinite(r) and r >= 0 for r in rates), (key, value, opt, sched, rates)
            accepted += 1
    assert accepted > 25 and refused > 100  # both sides of the line are exercised


def test_any_train_options_start_a_run_or_fail_in_one_line(places):
    seen: set[str] = set()
    options_hold(places, seen)
    # Not all refused at the door, nor all accepted: runs that start, usage errors and data errors.
    assert {"valid", "exit 1", "exit 2"} <= seen, seen


def test_any_recipe_values_start_a_run_or_fail_in_one_line(places, tmp_path):
    seen: set[str] = set()
    recipes_hold(places, seen, tmp_path)
    assert {"valid", "exit 2"} <= seen, seen
