"""The CUDA paths, pinned on the CPU: mocked device queries, spies on calls and gloo processes.

cnntrain's CUDA code could not run in CI (no GPU), so each defect found by reading it is held
fixed here by what can be checked without one; scripts/gpu_check.sh confirms the rest on a GPU.
Items are those of the CUDA-paths issue: 1 bf16/fp16, 2 resume RNG, 3 set-up timeout, 4 nvjpeg
stream order, 5 set_device, 6 DDP and an unreadable batch, 7 bench timing, 8 per-image seeding,
9 nvjpeg out of memory, 10 validation reads, 11 --deterministic on CUDA.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import time
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

from cnntrain import bench, engine, runtime
from cnntrain.data import gpu_decode
from cnntrain.data.sampler import SeededDataset

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with two visible GPUs, as far as cnntrain's device queries can tell."""
    calls: dict[str, list] = {"set_device": [], "capability": [], "get_rng": [], "set_rng": []}
    capability = {"value": (8, 0)}

    def set_rng_state(state, index):
        if index >= torch.cuda.device_count():  # what torch does for a GPU that is not there
            raise IndexError(f"list index out of range (device {index})")
        calls["set_rng"].append((state, index))

    def get_rng_state(index):
        calls["get_rng"].append(index)
        return torch.full((4,), index, dtype=torch.uint8)

    def capability_of(index=None):
        calls["capability"].append(index)
        return capability["value"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # emulation counts
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.version, "hip", None)
    calls["capability_value"] = capability  # type: ignore[assignment]
    return calls


# 1 -----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_only_from_compute_capability_8_else_fp16_with_a_scaler(fake_cuda, capability, dtype):
    from cnntrain.train.optim import OptimizerSettings, ScheduleSettings
    from cnntrain.train.state import TrainingState

    fake_cuda["capability_value"]["value"] = capability
    assert runtime.amp_dtype_for(CUDA1, None) == dtype
    assert fake_cuda["capability"] == [1]  # the device in use was asked, not the current one
    assert runtime.amp_dtype_for(CUDA1, False) is None and runtime.amp_dtype_for(torch.device("cpu"), None) is None
    scaler = TrainingState.create(nn.Linear(2, 2), OptimizerSettings(), ScheduleSettings(epochs=1), amp_dtype=dtype,
                                  monitor="val_acc", patience=None).scaler
    assert (scaler is not None) == (dtype == torch.float16)
    assert (runtime.grad_scaler(dtype) is not None) == (dtype == torch.float16)


# 2 -----------------------------------------------------------------------------------------------
def test_rng_state_carries_the_gpu_in_use_and_resumes_with_fewer_gpus(fake_cuda, monkeypatch):
    saved = runtime.rng_state(CUDA1)
    assert fake_cuda["get_rng"] == [1] and torch.equal(saved["cuda"], torch.full((4,), 1, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed where one GPU is visible
    runtime.set_rng_state(saved, CUDA0)
    (state, index), = fake_cuda["set_rng"]
    assert index == 0 and torch.equal(state, saved["cuda"])
    # a checkpoint of the earlier format: one state per GPU then visible (here two)
    old = dict(saved, cuda=[torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)])
    fake_cuda["set_rng"].clear()
    runtime.set_rng_state(old, CUDA0)
    assert [i for _, i in fake_cuda["set_rng"]] == [0] and torch.equal(fake_cuda["set_rng"][0][0], old["cuda"][0])
    fake_cuda["set_rng"].clear()
    runtime.set_rng_state(saved, torch.device("cpu"))  # training on the CPU touches no GPU generator
    assert fake_cuda["set_rng"] == []


# 5 -----------------------------------------------------------------------------------------------
def test_a_cuda_device_with_an_index_is_made_current(fake_cuda):
    assert runtime.resolve_device("cuda:1") == CUDA1
    assert fake_cuda["set_device"] == [CUDA1]
    runtime.resolve_device("cuda")
    runtime.resolve_device("cpu")
    assert fake_cuda["set_device"] == [CUDA1]  # no index: the current device stays


# 11 ----------------------------------------------------------------------------------------------
def test_deterministic_on_cuda_says_what_it_cannot_promise():
    note = runtime.deterministic_note(CUDA0, True)
    assert note is not None and "not bit-for-bit reproducible" in note and "adaptive average pooling" in note
    assert runtime.deterministic_note(torch.device("cpu"), True) is None
    assert runtime.deterministic_note(CUDA0, False) is None


# 8 -----------------------------------------------------------------------------------------------
class _Draws(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)


def test_per_image_seeding_leaves_the_cuda_generators_alone(monkeypatch):
    seeded_all: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded_all.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded_all.append)
    before = torch.get_rng_state()
    data = SeededDataset(_Draws())
    first, again, other = data[(11, 0)], data[(11, 1)], data[(12, 0)]
    assert torch.equal(first, again) and not torch.equal(first, other)  # the sample's seed decides the draw
    item = gpu_decode.Encoded(torch.zeros(1, dtype=torch.uint8), 0, "x.jpg", 11, 1,
                              transform=lambda image: image + torch.rand(3))
    assert torch.equal(gpu_decode._transform(torch.zeros(3), item), first)  # the device path draws the same
    assert seeded_all == []
    assert torch.equal(torch.get_rng_state(), before)


# 4 -----------------------------------------------------------------------------------------------
class _FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: _FakeStream) -> None:
        self.log.append(("wait", self.name, other.name))


class _FakeImage:
    def __init__(self, log: list) -> None:
        self.log = log

    def record_stream(self, stream: _FakeStream) -> None:
        self.log.append(("record", stream.name))


def test_nvjpeg_outputs_are_allocated_off_the_main_stream_and_recorded_on_it(monkeypatch):
    log: list = []
    current = {"stream": _FakeStream("main", log)}
    main = current["stream"]

    @contextmanager
    def use(stream):
        previous, current["stream"] = current["stream"], stream
        try:
            yield
        finally:
            current["stream"] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(gpu_decode, "_SIDE_STREAMS", {})

    def decode():
        log.append(("decode on", current["stream"].name))
        return [_FakeImage(log), None, _FakeImage(log)]

    images = gpu_decode.in_stream_order(decode, CUDA0)
    assert len(images) == 3 and images[1] is None
    assert log == [("decode on", "side"), ("wait", "main", "side"), ("record", "main"), ("record", "main")]
    log.clear()
    gpu_decode.in_stream_order(decode, CUDA0)
    assert log[0] == ("decode on", "side") and len(gpu_decode._SIDE_STREAMS) == 1  # one side stream per GPU
    seen = []
    monkeypatch.setattr(gpu_decode, "in_stream_order", lambda fn, device: seen.append(device) or list(fn()))
    gpu_decode._decode_jpegs([torch.zeros(1, dtype=torch.uint8)], torch.device("cpu"))
    assert seen == [torch.device("cpu")]  # every nvjpeg call goes through it


# 9 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to "
                                                "allocate 96.00 MiB")])
def test_out_of_memory_in_nvjpeg_is_not_taken_for_a_bad_jpeg(monkeypatch, error):
    import torchvision.io

    def decode_jpeg(data, mode=None, device=None):
        raise error

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        gpu_decode._decode_jpegs([torch.zeros(4, dtype=torch.uint8)] * 2, torch.device("cpu"))


def test_a_jpeg_nvjpeg_refuses_still_falls_back(monkeypatch):
    import torchvision.io

    def decode_jpeg(data, mode=None, device=None):
        if isinstance(data, list) or int(data[0]) == 0:
            raise RuntimeError("Error while decoding JPEG images: Unknown chroma subsampling")
        return torch.ones(3, 2, 2, dtype=torch.uint8)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    blobs = [torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)]
    out = gpu_decode._decode_jpegs(blobs, torch.device("cpu"))
    assert out[0] is None and out[1] is not None


# 10 ----------------------------------------------------------------------------------------------
def test_validation_sums_stay_on_the_device_until_the_end():
    """On the meta device every read back to the host raises: three batches must need none."""
    scores = engine._Scores(num_classes=7)
    for _ in range(3):
        logits = torch.empty(5, 7, device="meta")
        scores.add(logits, torch.empty((), device="meta"), torch.empty(5, dtype=torch.long, device="meta"))
    with pytest.raises((NotImplementedError, RuntimeError)):  # and the one read is the result's
        scores.result(1.0, None)


def test_validation_figures_read_once_are_the_per_batch_ones():
    torch.manual_seed(0)
    scores = engine._Scores(num_classes=7)
    logits, targets = torch.randn(3, 6, 7), torch.randint(0, 7, (3, 6))
    losses = [nn.functional.cross_entropy(logits[i], targets[i]) for i in range(3)]
    for i in range(3):
        scores.add(logits[i], losses[i], targets[i])
    result = scores.result(1.0, None)
    flat, labels = logits.reshape(-1, 7), targets.reshape(-1)
    assert result.images == 18
    assert result.loss == pytest.approx(float(sum(losses)) * 6 / 18)
    assert result.acc == pytest.approx(float((flat.argmax(1) == labels).float().mean()))
    top5 = flat.topk(5, dim=1).indices.eq(labels[:, None]).any(1).float().mean()
    assert result.top5 == pytest.approx(float(top5))
    expected = torch.zeros(7, 7, dtype=torch.int64)
    for t, p in zip(labels.tolist(), flat.argmax(1).tolist()):
        expected[t, p] += 1
    assert torch.equal(result.confusion.matrix, expected)


# 7 -----------------------------------------------------------------------------------------------
def test_bench_synchronises_around_the_call_that_sizes_its_blocks():
    events: list[str] = []
    bench._median_seconds(lambda: events.append("call"), runs=1, target=1e-9, sync=lambda: events.append("sync"))
    assert events[:4] == ["call", "sync", "call", "sync"]
    assert engine.sync_every_for(torch.device("cuda")) == engine.GPU_SYNC_EVERY > 1
    assert engine.sync_every_for(torch.device("cpu")) == 1


def test_bench_pipeline_trains_with_the_loop_settings_of_fit(monkeypatch, image_folder):
    from cnntrain.data import load_folder

    seen = []

    def spy(*args, sync_every=1, **kwargs):
        seen.append(sync_every)
        return engine.EpochTotals(seen=1, seconds=1.0)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    monkeypatch.setattr(engine, "sync_every_for", lambda device: 7)
    splits = load_folder(image_folder, val_split=0)
    row = {"arch": "resnet18", "img_size": 32, "batch_size": 8, "num_classes": splits.num_classes}
    tiny = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, splits.num_classes))
    bench.bench_pipeline(row, tiny, splits, device=torch.device("cpu"), amp_dtype=None,
                         channels_last=False, workers=0, epochs=1)
    assert seen == [7]
    assert row["efficiency"] == pytest.approx(1.0 / row["ceiling_images_per_s"][0])  # the spy's 1 image/s


# 3 and 6: two gloo processes -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, scenario: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    from cnntrain.train import distributed

    distributed.TIMEOUT = datetime.timedelta(seconds=1)  # the training collectives' timeout, shortened
    try:
        ctx, _ = distributed.setup(torch.device("cpu"))
        results.put((rank, "ok", _SCENARIOS[scenario](ctx)))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        results.put((rank, "error", f"{type(exc).__name__}: {exc}"[:300]))
    finally:
        distributed.cleanup()


def _slow_setup(ctx) -> str:
    """Rank 0 'scans' for longer than the training timeout while rank 1 waits for it."""
    with ctx.main_first():
        if ctx.is_main:
            time.sleep(3)
    ctx.barrier()  # a training collective afterwards still works
    return "set up"


def _one_rank_gets_an_unreadable_batch(ctx) -> tuple[int, list[float]]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
    good = (torch.full((2, 3, 2, 2), 0.5), torch.tensor([0, 1]), [])
    empty = (torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.long), ["bad1.jpg", "bad2.jpg"])
    loader = [good, good, good] if ctx.is_main else [good, empty, good]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batcher = engine.Batcher(torch.device("cpu"), None)
    totals = engine.train_one_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), batcher, agree=ctx.all)
    return totals.steps, [round(float(p.detach().sum()), 6) for p in model.parameters()]


_SCENARIOS = {"slow_setup": _slow_setup, "unreadable_batch": _one_rank_gets_an_unreadable_batch}


def _run_two_ranks(scenario: str) -> dict[int, tuple[str, object]]:
    context = multiprocessing.get_context("fork")  # (spawn would import torch and cnntrain again: 6 s)
    results = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_rank_main, args=(rank, port, scenario, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        out = {}
        for _ in procs:
            rank, status, value = results.get(timeout=90)
            out[rank] = (status, value)
        return out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


@pytest.mark.integration
def test_ranks_wait_for_a_set_up_longer_than_the_training_timeout():
    out = _run_two_ranks("slow_setup")
    assert out == {0: ("ok", "set up"), 1: ("ok", "set up")}


@pytest.mark.integration
def test_a_rank_with_an_unreadable_batch_skips_the_step_with_the_others():
    out = _run_two_ranks("unreadable_batch")
    assert out[0][0] == out[1][0] == "ok", out
    (steps0, weights0), (steps1, weights1) = out[0][1], out[1][1]
    assert steps0 == steps1 == 2  # the step rank 1 could not take, nobody took
    assert weights0 == weights1  # and the replicas are still the same model
