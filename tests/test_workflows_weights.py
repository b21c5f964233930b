"""Weights and built-in data as a new user meets them: importing one's own file, being offline,
giving the wrong file to --weights, a dataset download that fails (issue 17, items 5, 9, 10, 11).

Nothing here touches the network: downloads go to a closed loopback port, or the fetch itself
is replaced by one that fails the way an offline machine does.
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnntrain import weights
from cnntrain.cli import app
from cnntrain.errors import DataError, WeightsError
from cnntrain.http_download import FetchError

TINY = "squeezenet1_1"  # 1.2 M parameters: built and saved in a fraction of a second


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def _no_network(monkeypatch: pytest.MonkeyPatch, closed_port: int) -> None:
    """Any attempt to fetch fails: the mirror is a closed port and fetch itself refuses."""
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{closed_port}")

    def offline(url: str, *args: object, **kwargs: object) -> Path:
        raise FetchError(f"network used for {url}")

    monkeypatch.setattr(weights, "fetch", offline)


@pytest.fixture
def own_weights(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The user's own squeezenet1_1 ImageNet weights, saved under a name of their choosing."""
    from cnntrain.models import get_model

    torch.manual_seed(7)
    state = get_model(TINY, 1000).state_dict()
    path = tmp_path / "downloads" / "my_squeezenet.pth"
    path.parent.mkdir()
    torch.save(state, path)
    return path, state


# --- item 5: `download-weights --from FILE --arch NAME` ------------------------------------


@pytest.mark.parametrize("form", ["--arch", "positional"])
def test_imported_file_with_arch_is_used_by_pretrained_builds_offline(runner, own_weights, monkeypatch, closed_port,
                                                                      form):
    from cnntrain.models import build_model, get_spec

    src, state = own_weights
    args = ["--arch", TINY] if form == "--arch" else [TINY]
    result = runner.invoke(app, ["download-weights", "--from", str(src), *args])
    assert result.exit_code == 0, result.output
    expected = weights.cache_dir() / weights.file_name(get_spec(TINY).weights)
    assert expected.read_bytes() == src.read_bytes()
    assert expected.name in result.stdout and "imported.json" in result.stdout  # says what was done

    _no_network(monkeypatch, closed_port)
    model, report = build_model(TINY, 3, pretrained=True)
    own = model.state_dict()
    backbone = [k for k in state if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(own[k], state[k]) for k in backbone)
    assert report is not None and report.head is not None  # 1000 ImageNet classes -> 3

    listing = runner.invoke(app, ["download-weights", "--list"])
    assert expected.name in listing.stdout and "imported.json" not in listing.stdout


def test_imported_file_changed_afterwards_is_not_trusted(runner, own_weights, monkeypatch, closed_port):
    from cnntrain.models import build_model

    src, _ = own_weights
    assert runner.invoke(app, ["download-weights", "--from", str(src), "--arch", TINY]).exit_code == 0
    cached = next(p for p in weights.cache_dir().iterdir() if p.suffix == ".pth")
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    _no_network(monkeypatch, closed_port)
    with pytest.raises(WeightsError, match="changed since it was imported") as info:
        build_model(TINY, 3, pretrained=True)
    assert f"cnntrain download-weights --from FILE --arch {TINY}" in str(info.value)


def test_import_with_arch_refuses_a_file_that_does_not_fit(runner, tmp_path):
    src = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, src)
    result = runner.invoke(app, ["download-weights", "--from", str(src), "--arch", TINY])
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert str(src) in line and f"does not fit {TINY}" in line and "missing" in line
    cache = weights.cache_dir()
    assert not cache.exists() or not any(cache.iterdir())


def test_import_of_a_name_no_architecture_looks_for_needs_arch(runner, tmp_path):
    src = tmp_path / "my_resnet18.pth"
    torch.save({"w": torch.ones(1)}, src)
    result = runner.invoke(app, ["download-weights", "--from", str(src)])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "no architecture" in line and "--arch NAME" in line
    assert f"cnntrain download-weights --from {src} --arch resnet18" in line  # guessed from the file name
    cache = weights.cache_dir()
    assert not cache.exists() or not any(cache.iterdir())


# --- item 9: offline `download-weights` ----------------------------------------------------


def test_download_weights_through_a_dead_mirror_says_url_and_import_command(runner, closed_port):
    from cnntrain.models import get_spec

    url = get_spec(TINY).weights.url
    result = runner.invoke(app, ["download-weights", TINY, "--mirror", f"http://127.0.0.1:{closed_port}",
                                 "--timeout", "1"])
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "connection refused" in line and url in line
    assert f"cnntrain download-weights --from FILE --arch {TINY}" in line
    assert "--mirror" not in line  # one was given: suggesting it again does not help
    assert "--weights" not in line and "--no-pretrained" not in line  # options of train, not of this command


def test_download_weights_offline_suggests_a_mirror(runner, monkeypatch):
    from cnntrain.models import get_spec

    def offline(url: str, *args: object, **kwargs: object) -> Path:
        raise FetchError("cannot resolve download.pytorch.org (offline, or no DNS)")

    monkeypatch.setattr(weights, "fetch", offline)
    result = runner.invoke(app, ["download-weights", TINY])
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert get_spec(TINY).weights.url in line and f"--from FILE --arch {TINY}" in line
    assert "--mirror" in line and "--weights" not in line and "--no-pretrained" not in line


def test_download_weights_all_goes_on_after_failures_and_sums_up(runner, own_weights, closed_port):
    src, _ = own_weights
    assert runner.invoke(app, ["download-weights", "--from", str(src), "--arch", TINY]).exit_code == 0
    result = runner.invoke(app, ["download-weights", "--all", "--mirror", f"http://127.0.0.1:{closed_port}",
                                 "--timeout", "1"])
    assert result.exit_code == 1
    # alexnet fails first (alphabetical order); squeezenet1_1, much later, is still reported ready
    assert f"{TINY}: {weights.cache_dir()}" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("alexnet:") and "connection refused" in line for line in lines)
    summary = lines[-1]
    assert summary.startswith("error:") and "cached 1 of" in summary and "alexnet" in summary


# --- item 10: --weights given a file that is not a checkpoint -------------------------------


def _not_a_checkpoint(folder: Path, kind: str) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jpeg":
        path = folder / "x.jpg"
        Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
        return path, "JPEG image"
    if kind == "text":
        path = folder / "model.pth"
        path.write_text("these are not the weights you are looking for\n")
        return path, "text"
    path = folder / "empty.pt"
    path.write_bytes(b"")
    return path, "empty (0 bytes)"


@pytest.mark.parametrize("kind", ["jpeg", "text", "empty"])
@pytest.mark.parametrize("command", ["train", "predict"])
def test_weights_that_are_not_a_checkpoint_say_what_they_are(runner, image_folder, tmp_path, kind, command):
    path, looks_like = _not_a_checkpoint(tmp_path / "mine", kind)
    if command == "train":
        argv = ["train", "--data-path", str(image_folder), "--arch", TINY, "--weights", str(path), "--epochs", "1",
                "--project", str(tmp_path / "runs"), "--workers", "0"]
    else:
        argv = ["predict", str(next(image_folder.rglob("*.png"))), "--weights", str(path)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert str(path) in line and "not a PyTorch checkpoint" in line and looks_like in line
    assert "torch.save" in line and "best.pt" in line  # what was expected instead
    assert "delete" not in line  # it is the user's file, not a cache entry
    assert path.exists()
    assert not list((tmp_path / "runs").rglob("*.pt"))  # nothing was trained


@pytest.mark.parametrize(("content", "looks_like"), [
    (b"<!DOCTYPE html><html><body>Sign in to download</body></html>", "an HTML page"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG image"),
    ("zip", "a ZIP archive that torch.save did not write"),
])
def test_other_files_are_named_for_what_they_are(tmp_path, content, looks_like):
    import zipfile

    from cnntrain import checkpoint
    from cnntrain.errors import CheckpointError

    path = tmp_path / "weights.pth"
    if content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes/readme.txt", "hello")
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    text = str(info.value)
    assert f"{path} is not a PyTorch checkpoint (" in text and looks_like in text and "delete" not in text


def test_damaged_cached_download_still_says_download_again(monkeypatch):
    """Only the weights cache, which cnntrain fills itself, gets the 'delete it' advice."""
    from cnntrain.models import get_spec

    w = get_spec(TINY).weights
    cache = weights.cache_dir()
    cache.mkdir(parents=True)
    (cache / weights.file_name(w)).write_text("not weights")
    monkeypatch.setattr(weights, "verify", lambda path, **kw: None)  # as if the name carried no hash
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is CheckpointError, the text is the point
        weights.load_state_dict(w, download_missing=False, arch=TINY)
    text = str(info.value)
    assert "delete it" in text and f"cnntrain download-weights {TINY}" in text


# --- item 11: a built-in dataset whose download fails ---------------------------------------


def test_cifar10_download_failure_says_what_failed_the_url_and_where_files_go(tmp_path, monkeypatch):
    import torchvision

    from cnntrain.data.builtins import load_builtin

    class OfflineCIFAR10:
        def __init__(self, root, train=True, download=True):
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    with pytest.raises(DataError) as info:
        load_builtin("cifar10", root=tmp_path)
    text = str(info.value)
    assert "\n" not in text and "Errno" not in text
    assert "download of cifar10" in text and "cannot resolve www.cs.toronto.edu" in text
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in text
    assert str(tmp_path / "cifar-10-batches-py") in text  # where the extracted files go by hand
    assert not (tmp_path / "cifar10-png").exists()
