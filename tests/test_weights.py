"""Pretrained weights: download, cache, verify and safe loading, against a loopback server.

Nothing here touches the network: a ThreadingHTTPServer on 127.0.0.1 serves in-memory files
and misbehaves on purpose (truncates, stalls, lies about content, 404s).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cnntrain import fileio, weights
from cnntrain.errors import CheckpointError, DownloadError, WeightsError

NET = pytest.mark.timeout(30)


# --- fixtures -------------------------------------------------------------------------------


def _tiny_state() -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.arange(12.0).reshape(3, 4), "fc.bias": torch.ones(3)}


def _to_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny() -> SimpleNamespace:
    """A real torch.save file and the hub-style name its SHA-256 gives it."""
    data = _to_bytes(_tiny_state())
    name = f"tiny-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    return SimpleNamespace(data=data, name=name, state=_tiny_state())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point TORCH_HOME at a temp folder; return the (not yet created) weights cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    folder = weights.cache_dir()
    assert folder == tmp_path / "torch_home" / "hub" / "checkpoints"
    return folder


def _listing(folder: Path) -> set[str]:
    """Everything in a folder, hidden temp files included."""
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _assert_one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- names and URLs -------------------------------------------------------------------------


def test_file_name_and_hash_prefix() -> None:
    from torchvision.models import ResNet50_Weights

    assert weights.file_name(ResNet50_Weights.IMAGENET1K_V2) == "resnet50-11ad3fa6.pth"
    assert weights.file_name("https://x.org/a/b/net-0123abcd.pth?sig=1") == "net-0123abcd.pth"
    assert weights.hash_prefix("resnet50-11ad3fa6.pth") == "11ad3fa6"
    assert weights.hash_prefix("alexnet-owt-7be5be79.pth") == "7be5be79"
    assert weights.hash_prefix("mobilenet_v2_qnnpack_37f702c5.pth") is None
    assert weights.hash_prefix("plain.pth") is None
    with pytest.raises(WeightsError):
        weights.file_name("https://x.org/")


def test_resolve_url_with_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torchvision.models import ResNet50_Weights

    w = ResNet50_Weights.IMAGENET1K_V2
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    assert weights.resolve_url(w) == w.url
    assert weights.resolve_url(w, "http://mirror.lan/torch/") == "http://mirror.lan/torch/resnet50-11ad3fa6.pth"
    assert weights.resolve_url(w.url, "http://mirror.lan/torch") == "http://mirror.lan/torch/resnet50-11ad3fa6.pth"
    monkeypatch.setenv(weights.MIRROR_ENV, "https://env.mirror/w")
    assert weights.resolve_url(w) == "https://env.mirror/w/resnet50-11ad3fa6.pth"
    assert weights.resolve_url(w, "http://explicit/") == "http://explicit/resnet50-11ad3fa6.pth"
    local = weights.resolve_url(w, str(tmp_path))  # a plain folder works as a mirror too
    assert local == (tmp_path / "resnet50-11ad3fa6.pth").as_uri()


# --- downloads ------------------------------------------------------------------------------


@NET
def test_download_good_file_then_reuse(server, cache: Path, tiny, capsys) -> None:
    url = server.add(tiny.name, tiny.data)
    path = weights.download(url, timeout=5, progress=True)
    assert path == cache / tiny.name
    assert path.read_bytes() == tiny.data
    assert _listing(cache) == {tiny.name}
    _same_state(weights.safe_load(path), tiny.state)

    again = weights.download(url, timeout=5, progress=False)
    assert again == path
    assert server.hits == [f"/w/{tiny.name}"]  # verified file reused, not fetched again

    entries = weights.list_cached()
    assert [(e["name"], e["size"], e["path"]) for e in entries] == [(tiny.name, len(tiny.data), path)]


@NET
def test_download_without_content_length(server, tmp_path: Path, tiny) -> None:
    url = server.add(tiny.name, tiny.data, kind="no_length")
    path = weights.download(url, tmp_path / "dl", timeout=5, progress=False)
    assert path.read_bytes() == tiny.data


@NET
def test_download_replaces_corrupt_existing_file(server, cache: Path, tiny) -> None:
    cache.mkdir(parents=True)
    (cache / tiny.name).write_bytes(b"garbage")
    path = weights.download(server.add(tiny.name, tiny.data), timeout=5, progress=False)
    assert path.read_bytes() == tiny.data
    assert _listing(cache) == {tiny.name}


@NET
@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("truncated", "cut short"),
        ("wrong_hash", "hash check"),
        ("stall_headers", "no answer"),
        ("stall_body", "stalled"),
        ("missing", "HTTP 404"),
        ("refused", "connection refused"),
    ],
)
def test_download_failures_leave_nothing(server, cache: Path, closed_port: int, tiny, kind: str, expect: str) -> None:
    cache.mkdir(parents=True)
    (cache / "other-00000000.pth").write_bytes(b"someone else's file")
    before = _listing(cache)
    name = tiny.name
    if kind == "truncated":
        url = server.add(name, tiny.data, kind="truncated")
    elif kind == "wrong_hash":
        url = server.add(name, tiny.data + b"tampered")
    elif kind in ("stall_headers", "stall_body"):
        url = server.add(name, tiny.data, kind=kind)
    elif kind == "missing":
        url = f"{server.base}/w/{name}"
    else:
        url = f"http://127.0.0.1:{closed_port}/w/{name}"

    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        weights.download(url, timeout=0.5, progress=False, arch="tinynet")
    assert time.monotonic() - started < 5
    text = _assert_one_line(info.value)
    assert expect in text
    assert name in text
    assert "--mirror" in text and "cnntrain download-weights tinynet --from FILE" in text
    assert _listing(cache) == before  # nothing new, no temp files either


@NET
def test_ensure_cached_downloads_through_mirror(server, cache: Path, tiny, monkeypatch) -> None:
    server.add(tiny.name, tiny.data)
    w = SimpleNamespace(url=f"https://download.invalid/models/{tiny.name}")
    path = weights.ensure_cached(w, mirror=server.mirror, timeout=5, progress=False)
    assert path == cache / tiny.name and path.read_bytes() == tiny.data

    path.unlink()
    monkeypatch.setenv(weights.MIRROR_ENV, server.mirror)
    _same_state(weights.load_state_dict(w, timeout=5, progress=False), tiny.state)
    assert server.hits == [f"/w/{tiny.name}"] * 2


def test_ensure_cached_missing_names_three_ways_out(cache: Path, tiny) -> None:
    w = SimpleNamespace(url=f"https://download.invalid/models/{tiny.name}")
    with pytest.raises(WeightsError) as info:
        weights.ensure_cached(w, download_missing=False, arch="resnet50")
    text = _assert_one_line(info.value)
    assert "cnntrain download-weights resnet50" in text
    assert "--weights FILE" in text and "--no-pretrained" in text
    assert not cache.exists() or _listing(cache) == set()


@NET
def test_ensure_cached_failed_download_names_three_ways_out(cache: Path, closed_port: int, tiny) -> None:
    w = SimpleNamespace(url=f"https://download.invalid/models/{tiny.name}")
    with pytest.raises(WeightsError) as info:  # a DownloadError is a WeightsError
        weights.load_state_dict(w, mirror=f"http://127.0.0.1:{closed_port}", timeout=0.5, progress=False)
    assert isinstance(info.value, DownloadError)
    text = _assert_one_line(info.value)
    assert "connection refused" in text
    assert "cnntrain download-weights" in text and "--weights FILE" in text and "--no-pretrained" in text
    assert _listing(cache) == set()


# --- import, verify, list -------------------------------------------------------------------


def test_import_file(cache: Path, tmp_path: Path, tiny) -> None:
    src = tmp_path / "elsewhere" / tiny.name
    src.parent.mkdir()
    src.write_bytes(tiny.data)
    path = weights.import_file(src)
    assert path == cache / tiny.name and path.read_bytes() == tiny.data
    assert weights.import_file(path) == path  # importing the cached file itself is a no-op

    # a file saved under another name, stored under the name the weights expect
    renamed = tmp_path / "elsewhere" / "download.pth"
    renamed.write_bytes(tiny.data)
    other = tmp_path / "other_cache"
    assert weights.import_file(renamed, other, name=tiny.name) == other / tiny.name


def test_import_file_rejects_bad_hash(cache: Path, tmp_path: Path, tiny) -> None:
    src = tmp_path / tiny.name
    src.write_bytes(tiny.data + b"x")
    with pytest.raises(WeightsError) as info:
        weights.import_file(src, arch="tinynet")
    text = _assert_one_line(info.value)
    assert str(src) in text and "SHA-256" in text
    assert _listing(cache) == set()
    with pytest.raises(WeightsError, match="not found"):
        weights.import_file(tmp_path / "nope-12345678.pth")


@NET
def test_corrupted_cache_file_is_reported_not_loaded(server, cache: Path, tiny, monkeypatch) -> None:
    path = weights.download(server.add(tiny.name, tiny.data), timeout=5, progress=False)
    weights.verify(path)  # fine as downloaded
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(WeightsError, match="corrupted cache file") as info:
        weights.verify(path, arch="tinynet")
    assert "cnntrain download-weights tinynet" in _assert_one_line(info.value)

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a corrupted file must not be unpickled")

    monkeypatch.setattr(torch, "load", no_load)
    w = SimpleNamespace(url=f"{server.mirror}/{tiny.name}")
    with pytest.raises(WeightsError, match="corrupted cache file"):
        weights.load_state_dict(w, progress=False)
    assert server.hits == [f"/w/{tiny.name}"]  # reported, not silently fetched again


# --- safe loading ---------------------------------------------------------------------------


def _write_marker(path: str) -> int:
    Path(path).write_text("pwned")
    return 0


class _EvilSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilFunction(_EvilSystem):
    def __reduce__(self):
        return (_write_marker, (str(self.marker),))


@pytest.mark.parametrize("evil", [_EvilSystem, _EvilFunction])
def test_safe_load_refuses_code(tmp_path: Path, evil: type) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"x": evil(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        weights.safe_load(path)
    text = _assert_one_line(info.value)
    assert "refused" in text and "not plain tensors" in text and str(path) in text
    assert not marker.exists()


def test_evil_payload_is_real(tmp_path: Path) -> None:
    """The refusal test above means something: unpickled unsafely, the payload does run."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"x": _EvilFunction(marker)}, path)
    torch.load(path, weights_only=False)  # only ever in this test, on a harmless payload
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("damage", ["empty", "half", "junk"])
def test_safe_load_damaged_files(tmp_path: Path, tiny, damage: str) -> None:
    path = tmp_path / f"{damage}.pth"
    content = {"empty": b"", "half": tiny.data[: len(tiny.data) // 2], "junk": b"not a checkpoint" * 10}
    path.write_bytes(content[damage])
    with pytest.raises(CheckpointError) as info:
        weights.safe_load(path)
    text = _assert_one_line(info.value)
    # Checked without the path: pytest's folder for this test is itself named "...damaged...".
    reason = {"empty": "is empty (0 bytes)", "half": "is damaged", "junk": "it is a text file"}[damage]
    assert str(path) in text and reason in text.replace(str(path), "")


def test_safe_load_missing_and_good(tmp_path: Path, tiny) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        weights.safe_load(tmp_path / "nope.pth")
    path = fileio.atomic_write_bytes(tmp_path / "ok.pth", tiny.data)
    _same_state(weights.safe_load(path), tiny.state)


# --- torchvision builders -------------------------------------------------------------------


def test_safe_torchvision_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision
    from torchvision.models import ShuffleNet_V2_X0_5_Weights, WeightsEnum

    original = WeightsEnum.__dict__["get_state_dict"]
    torch.manual_seed(0)
    fake = {k: v.clone() for k, v in torchvision.models.shufflenet_v2_x0_5(weights=None).state_dict().items()}
    calls = []

    def fake_load(w, **kw):
        calls.append((w, kw))
        return fake

    def hub_forbidden(*args, **kwargs):
        raise AssertionError("torch.hub must not be used inside safe_torchvision_loading")

    monkeypatch.setattr(weights, "load_state_dict", fake_load)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", hub_forbidden)
    torch.manual_seed(1)  # a fresh build would differ from `fake`
    with weights.safe_torchvision_loading(timeout=3.0):
        assert WeightsEnum.__dict__["get_state_dict"] is not original
        model = torchvision.models.shufflenet_v2_x0_5(weights=ShuffleNet_V2_X0_5_Weights.DEFAULT)
    assert WeightsEnum.__dict__["get_state_dict"] is original
    _same_state(model.state_dict(), fake)
    assert calls == [(ShuffleNet_V2_X0_5_Weights.DEFAULT, {"progress": True, "timeout": 3.0})]

    with pytest.raises(RuntimeError, match="boom"), weights.safe_torchvision_loading():
        raise RuntimeError("boom")
    assert WeightsEnum.__dict__["get_state_dict"] is original


# --- fileio ---------------------------------------------------------------------------------


def test_atomic_write_failure_keeps_target(tmp_path: Path) -> None:
    target = tmp_path / "state.pth"
    fileio.atomic_write_text(target, "old")
    with pytest.raises(ZeroDivisionError), fileio.atomic_open(target) as f:
        f.write(b"half of the new")
        1 / 0  # noqa: B018
    assert target.read_text() == "old"
    assert _listing(tmp_path) == {"state.pth"}

    fileio.atomic_write(target, lambda f: torch.save({"a": torch.ones(2)}, f))
    assert torch.equal(weights.safe_load(target)["a"], torch.ones(2))
    assert _listing(tmp_path) == {"state.pth"}


def test_atomic_path_publishes_only_a_finished_file(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ZeroDivisionError), fileio.atomic_path(target) as tmp:
        assert fileio.is_temp_name(tmp.name) and tmp.parent == tmp_path
        tmp.write_bytes(b"half of the new")
        1 / 0  # noqa: B018
    assert target.read_bytes() == b"previous" and _listing(tmp_path) == {"model.onnx"}
    with pytest.raises(FileNotFoundError), fileio.atomic_path(target):
        pass  # a writer that wrote nothing must not publish nothing
    assert target.read_bytes() == b"previous" and _listing(tmp_path) == {"model.onnx"}
    with fileio.atomic_path(tmp_path / "new" / "model.onnx") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "new" / "model.onnx").read_bytes() == b"new" and _listing(tmp_path / "new") == {"model.onnx"}


def test_format_bytes_counts_decimal_units() -> None:
    assert [fileio.format_bytes(n) for n in (0, 999, 4_200, 3_400_000, 1_250_000_000)] == [
        "0 bytes", "999 bytes", "4.2 KB", "3.4 MB", "1.25 GB"]


def test_weights_dir_is_torch_hubs_with_or_without_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from cnntrain import paths

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert weights.cache_dir() == paths.weights_dir() == Path(torch.hub.get_dir()) / "checkpoints"
    monkeypatch.setitem(sys.modules, "torch.hub", None)  # as if torch were not loaded: computed the same way
    assert paths.weights_dir() == tmp_path / "th" / "hub" / "checkpoints"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.weights_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"


def test_clean_stale_temps_and_sha256(tmp_path: Path) -> None:
    keep = fileio.atomic_write_bytes(tmp_path / "keep.pth", b"data")
    stale = tmp_path / fileio.temp_name(keep)
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / fileio.temp_name(keep)
    fresh.write_bytes(b"being written")

    assert fileio.clean_stale_temps(tmp_path) == [stale]  # a busy writer's temp survives
    assert fresh.exists()
    assert fileio.clean_stale_temps(tmp_path, older_than=0) == [fresh]
    assert _listing(tmp_path) == {"keep.pth"}
    assert fileio.clean_stale_temps(tmp_path / "missing") == []
    assert fileio.sha256_file(keep) == hashlib.sha256(b"data").hexdigest()
