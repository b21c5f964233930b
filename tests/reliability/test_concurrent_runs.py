"""Runs started at the same moment: each claims its own run folder, and what they share stays valid.

A CI matrix starts several `cnntrain train` jobs at once with one --project and --name, on one
dataset and one cache folder. These tests start real processes behind a barrier, so the calls
race as those jobs' calls do, but call the library functions directly instead of whole trainings.
Processes are forked: the tests' fixtures (an isolated CNNTRAIN_HOME, a patched URL) carry over.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from cnntrain import checkpoint, fileio, paths, weights
from cnntrain.cli import app
from cnntrain.data import builtins, dataset_download, imagecache
from cnntrain.data.imagecache import build_image_cache
from cnntrain.data.scan import scan_samples
from cnntrain.data.shapes import generate_shapes
from cnntrain.models import stats

CTX = multiprocessing.get_context("fork")
RUNS, CLAIMS_EACH = 12, 5


def _released_together(barrier: Any, results: Any, index: int, func: Callable[..., Any], args: tuple) -> None:
    try:
        barrier.wait(timeout=60)
        results.put((index, None, func(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails naming it
        results.put((index, f"{type(exc).__name__}: {exc}", None))


def together(func: Callable[..., Any], calls: Sequence[tuple], timeout: float = 120) -> list[Any]:
    """``func(*args)`` for each ``args`` of ``calls``, each in its own process, all released at
    the same moment by a barrier; their results in order. Any exception fails the test."""
    barrier, results = CTX.Barrier(len(calls)), CTX.Queue()
    procs = [CTX.Process(target=_released_together, args=(barrier, results, i, func, args))
             for i, args in enumerate(calls)]
    for proc in procs:
        proc.start()
    try:
        answers = sorted(results.get(timeout=timeout) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [f"process {i}: {error}" for i, error, _ in answers if error]
    assert not errors, "\n".join(errors)
    return [value for _, _, value in answers]


def temp_names(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if fileio.is_temp_name(p.name)]


# --- run folders --------------------------------------------------------------------------


def _claim_runs(project: Path, name: str, count: int) -> list[str]:
    """What a run does first: claim its folder, write a file there as its own, point latest at it."""
    claimed = []
    for _ in range(count):
        run = checkpoint.new_run_dir(project, name)
        with open(run / "owner", "x") as f:  # "x": a second run in this folder fails here
            f.write(str(os.getpid()))
        checkpoint.point_latest(run)
        claimed.append(run.name)
    return claimed


@pytest.mark.timeout(120)
def test_runs_started_together_with_one_name_each_claim_their_own_folder(tmp_path):
    """12 processes claim 5 folders each, all named `same`: 60 folders, same ... same60, one run in
    each, and `latest` names one of them. Checking for a free name and then creating it fails this."""
    project = tmp_path / "runs"
    claimed = [name for names in together(_claim_runs, [(project, "same", CLAIMS_EACH)] * RUNS) for name in names]
    expected = {"same"} | {f"same{i}" for i in range(2, RUNS * CLAIMS_EACH + 1)}
    assert sorted(claimed) == sorted(expected)  # no folder handed out twice, none skipped
    assert len({(project / name / "owner").read_text() for name in claimed}) == RUNS
    latest = checkpoint.latest_run(project)
    assert latest is not None and latest.name in expected and (latest / "owner").is_file()
    assert temp_names(project) == []  # every process's temporary link was renamed into place


def test_runs_started_together_with_exist_ok_share_their_folder(tmp_path):
    project = tmp_path / "runs"
    shared = together(checkpoint.new_run_dir, [(project, "shared", True)] * 4)
    assert shared == [project / "shared"] * 4 and sorted(os.listdir(project)) == ["shared"]


@pytest.mark.parametrize("name", ["", "a/b", "..", "latest"])
def test_a_run_name_that_is_not_one_folder_of_its_own_is_refused_before_any_work(runner, tmp_path, name):
    """`latest` is the link to the run last started; a name with a separator is not a folder in
    --project. Either is a usage error before the data (here: none) is looked at."""
    result = runner.invoke(app, ["train", "--data-path", str(tmp_path / "nowhere"), "--name", name,
                                 "--project", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "--name" in result.stderr and "nowhere" not in result.stderr
    assert not (tmp_path / "runs").exists()


# --- caches of one dataset ----------------------------------------------------------------


def small_folder(root: Path, per_class: int = 9) -> list[tuple[str, int]]:
    """Two classes of tiny PNGs plus two files that are not images: the samples, in order."""
    samples = []
    for label, name in enumerate(("x", "y")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"{i}.png"
            Image.new("RGB", (20 + i, 18), (40 * i, 100 * label, 90)).save(path)
            samples.append((str(path), label))
        bad = root / name / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        samples.append((str(bad), label))
    return samples


def _scan(samples: list[tuple[str, int]]) -> tuple[list, list]:
    result = scan_samples(samples, workers=0)
    return result.good, result.bad


def test_runs_scanning_one_folder_together_agree_and_keep_every_verdict(tmp_path):
    """Three processes scan thirds of one folder (one cache file): each gets the right verdicts,
    and the file then holds all of them, so a full scan decodes nothing. A cache written without
    re-reading it would keep only the last writer's third."""
    samples = small_folder(tmp_path / "data")
    thirds = [(samples[i::3],) for i in range(3)]
    for (part,), (good, bad) in zip(thirds, together(_scan, thirds)):
        assert good == [s for s in part if "broken" not in s[0]]
        assert [path for path, _ in bad] == [p for p, _ in part if "broken" in p]
    everything = scan_samples(samples, workers=0)
    assert everything.cached == len(samples) == everything.total
    assert len(everything.bad) == 2
    assert [p.name for p in paths.scan_cache_dir().iterdir() if not p.name.startswith(".")] != []
    assert temp_names(paths.scan_cache_dir()) == []


def _counting_fill(counter: Path) -> Callable[..., Any]:
    real = imagecache._fill

    def fill(*args: Any, **kwargs: Any) -> Any:
        with open(counter, "a") as f:  # O_APPEND: one line per build, from any process
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    return fill


def _disk_cache(samples: list[tuple[str, int]]) -> tuple[list, str, list]:
    lines: list[str] = []
    cache = build_image_cache(samples, short_side=16, mode="disk", max_gb=None, workers=0, log=lines.append)
    assert cache is not None
    pixels = hashlib.sha256(cache.data.numpy().tobytes()).hexdigest()
    return cache.entries.tolist(), pixels, lines


def test_runs_caching_one_folder_together_build_the_disk_cache_once(tmp_path, monkeypatch):
    samples = small_folder(tmp_path / "data")
    counter = tmp_path / "builds"
    monkeypatch.setattr(imagecache, "_fill", _counting_fill(counter))
    built = together(_disk_cache, [(samples,)] * 3)
    assert len(counter.read_text().splitlines()) == 1  # one builder; the others waited and read its cache
    assert all(entries == built[0][0] and pixels == built[0][1] for entries, pixels, _ in built)
    root = paths.image_cache_dir()
    caches = [p for p in root.iterdir() if p.is_dir()]
    assert len(caches) == 1 and (caches[0] / "index.json").is_file()
    assert temp_names(root) == []


def _count(name: str) -> dict[str, Any]:
    return stats.model_stats_cached([name], img_size=64)


def test_commands_counting_models_together_keep_every_count():
    """Two processes count different models into one statistics file: both counts are kept."""
    names = ["squeezenet1_0", "squeezenet1_1"]
    together(_count, [(name,) for name in names])
    cached = json.loads(stats._stats_cache_path().read_text(encoding="utf-8"))
    assert sorted(cached) == sorted(f"{name}@64" for name in names)


# --- downloads ----------------------------------------------------------------------------


def _download(url: str, folder: Path) -> tuple[Path, str]:
    path = weights.download(url, folder, progress=False, timeout=30)
    return path, fileio.sha256_file(path)


def test_runs_downloading_the_same_weights_together_get_one_verified_file(server, tmp_path):
    """Each process streams into its own temporary file and renames it over the same name once its
    hash checks out: all of them end with the one whole file, and no temporary file is left."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(50_000.0)}, buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest()
    url = server.add(f"tiny-{digest[:10]}.pth", body)
    folder = tmp_path / "weights"
    got = together(_download, [(url, folder)] * 3)
    assert got == [(folder / f"tiny-{digest[:10]}.pth", digest)] * 3
    assert os.listdir(folder) == [f"tiny-{digest[:10]}.pth"]


def _flowers(root: Path) -> tuple[list[str], int, int]:
    splits = builtins.load_builtin("flowers", val_split=0.25, root=root)
    return splits.classes, len(splits.train), len(splits.val)


def test_runs_fetching_a_built_in_dataset_together_all_get_it_whole(server, tmp_path, monkeypatch):
    """Three processes download, verify and extract the same archive: each loads the whole dataset,
    and the cache holds one copy, without archive or temporary folders."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for cls in ("daisy", "roses"):
            for i in range(4):
                image = io.BytesIO()
                Image.new("RGB", (12, 12), (60 * i, 20, 20)).save(image, format="PNG")
                info = tarfile.TarInfo(f"flower_photos/{cls}/{i}.jpg")
                info.size = image.tell()
                tf.addfile(info, io.BytesIO(image.getvalue()))
    archive = buf.getvalue()
    monkeypatch.setattr(builtins, "FLOWERS_URL", server.add("flower_photos.tgz", archive))
    monkeypatch.setattr(builtins, "FLOWERS_SIZE", len(archive))
    monkeypatch.setattr(builtins, "FLOWERS_SHA256", hashlib.sha256(archive).hexdigest())
    root = tmp_path / "datasets"
    assert together(_flowers, [(root,)] * 3) == [(["daisy", "roses"], 6, 2)] * 3
    assert os.listdir(root) == ["flower_photos"]


def test_a_run_that_finds_the_archive_gone_and_the_dataset_extracted_uses_the_folder(tmp_path, monkeypatch):
    """The moment a run fetching a dataset can lose to one started with it: between this run's
    check and its extraction, the other extracted the archive and removed it. The archive is then
    simply not there (not an error), and the extracted folder is the dataset."""
    (tmp_path / "flower_photos" / "daisy").mkdir(parents=True)
    archive = tmp_path / "flower_photos.tgz"  # removed by the other run
    assert dataset_download.extract_tar(archive, tmp_path, "flower_photos") == tmp_path / "flower_photos"
    archive.write_bytes(b"being checked while the other run removes it")

    def removed_meanwhile(path: Any) -> str:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(dataset_download, "sha256_file", removed_meanwhile)
    assert dataset_download.verify_file(archive, "0" * 64) is False


def _shapes(dest: Path) -> list[str]:
    folder = generate_shapes(dest, train_per_class=2, val_per_class=1, size=16)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


def test_runs_generating_the_shapes_dataset_together_end_with_one_copy(tmp_path):
    dest = tmp_path / "datasets" / "shapes"
    drawn = together(_shapes, [(dest,)] * 3)
    assert drawn[0] and drawn == [drawn[0]] * 3
    assert os.listdir(dest.parent) == ["shapes"]
