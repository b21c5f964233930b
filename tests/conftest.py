"""Shared fixtures: tiny generated image folders, an isolated cache, a CLI runner and a
loopback HTTP server that misbehaves on purpose (truncates, stalls, 404s).

Nothing here touches the network or the user's caches: TORCH_HOME and CNNTRAIN_HOME point
into a temporary folder for every test.
"""

from __future__ import annotations

import http.server
import os
import random
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from typer.testing import CliRunner

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes on two cores: one thread each (subprocesses inherit it), or torch's
    # thread pools stall each other badly.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

# Class -> base colour: learnable from colour alone, so a 2-epoch run on a tiny model must
# beat chance by far unless the pipeline is broken (labels shuffled, normalisation wrong...).
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def make_image_folder(root: Path, per_class: int = 12, size: int = 40, classes=tuple(COLOURS), seed: int = 0,
                      ext: str = ".png") -> Path:
    """ImageFolder layout root/<class>/<n>.png with noisy, colour-coded images."""
    rng = random.Random(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = COLOURS.get(name, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        for i in range(per_class):
            w, h = size + rng.randrange(0, 12), size + rng.randrange(0, 12)
            img = Image.new("RGB", (w, h), tuple(max(0, min(255, c + rng.randrange(-40, 41))) for c in base))
            # a random grey bar, so images are not constant
            x = rng.randrange(0, w // 2)
            img.paste((128, 128, 128), (x, 0, x + w // 6, h))
            img.save(folder / f"{i:03d}{ext}")
    return root


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("CNNTRAIN_HOME", str(home / "cnntrain"))
    monkeypatch.delenv("CNNTRAIN_WEIGHTS_MIRROR", raising=False)
    return home


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A 3-class folder (12 images each), shared read-only by tests."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "colours")


@pytest.fixture
def one_torch_thread():
    """Tiny models step and time faster on one thread, and two processes on a busy 2-core box can
    stall each other's OpenMP pools badly. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def config_of(runner, monkeypatch):
    """``config_of(*argv)``: the TrainConfig ``cnntrain train ARGV`` would train with; nothing is trained."""
    import cnntrain.train
    from cnntrain.cli import app

    seen = {}

    class Stop(Exception):
        pass

    def fake_fit(cfg, resume=None):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(cnntrain.train, "fit", fake_fit)

    def run(*argv):
        result = runner.invoke(app, ["train", *argv])
        assert isinstance(result.exception, Stop), result.output
        return seen["cfg"]

    return run


# --- loopback HTTP server (127.0.0.1 only) --------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    routes: dict[str, tuple[str, bytes]]
    hits: list[str]
    release: threading.Event

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up on a stalled or truncated reply is the point of these tests


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        kind, body = route
        if kind == "stall_headers":  # accept, then say nothing
            self.server.release.wait(10)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if kind != "no_length":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "truncated":  # promise everything, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if kind == "stall_body":  # start, then go quiet
            self.wfile.write(body[:64])
            self.wfile.flush()
            self.server.release.wait(10)
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.routes, srv.hits, srv.release = {}, [], threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"

    def add(name: str, body: bytes, kind: str = "good", folder: str = "/w") -> str:
        srv.routes[f"{folder}/{name}"] = (kind, body)
        return f"{base}{folder}/{name}"

    try:
        yield SimpleNamespace(base=base, mirror=f"{base}/w", add=add, hits=srv.hits)
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
