"""GPU slots (``gpu.slots_per_device``): which GPU a training takes and how much of it.

No GPU exists on the machines these tests run on: where a test needs a host with GPUs,
torch's CUDA queries are replaced by fakes that say how many GPUs there are and how much
memory they have (named ``fake_*``); everything above them is the real code.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.config import ConfigError, DataConfig, parse_config
from tasks.hpo import trial_stages
from tasks.preflight import check_gpu_slots
from tasks.training import gpus, loaders
from tasks.training.auto import fits_in_memory, largest_fitting
from tasks.training.fmfp import resolve_device
from tasks.training.gpus import (
    SLOTS_ENV,
    GpuSlot,
    capacity_error,
    current_slot,
    device_budget,
    gpu_slot,
    slots_per_device,
)
from tests.conftest import tiny_config

GIB = 1 << 30


@pytest.fixture(autouse=True)
def _no_host_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SLOTS_ENV, raising=False)


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A host with two fake 80 GiB GPUs: the CUDA queries the slots make, recorded."""
    host: dict[str, Any] = {"count": 2, "free": 80 * GIB, "current": 0, "set": []}

    def fake_set_device(index: int) -> None:
        host["set"].append(index)
        host["current"] = index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: host["count"] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: host["count"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: host["current"])
    monkeypatch.setattr(torch.cuda, "set_device", fake_set_device)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (host["free"], 80 * GIB))
    return host


def test_slots_fill_the_gpus_in_turn() -> None:
    assert [GpuSlot(i, 2).device_index(2) for i in range(4)] == [0, 0, 1, 1]
    assert [GpuSlot(i, 1).device_index(2) for i in range(4)] == [0, 1, 0, 1]
    assert [GpuSlot(i, 3).device_index(1) for i in range(3)] == [0, 0, 0]


def test_how_many_trainings_share_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # auto, in the study's process: study.parallel spread evenly over the visible GPUs
    assert slots_per_device("auto", 4, 2, in_process=True) == 2
    assert slots_per_device("auto", 3, 2, in_process=True) == 2
    assert slots_per_device("auto", 1, 4, in_process=True) == 1
    assert slots_per_device("auto", 2, 0, in_process=True) == 2  # no GPU: nothing to share
    # auto on a gpu worker: the worker is one slot
    assert slots_per_device("auto", 4, 1, in_process=False) == 1
    assert slots_per_device(3, 4, 1, in_process=False) == 3
    # the host's own layout (infra/workers.sh) wins over the study's config
    monkeypatch.setenv(SLOTS_ENV, "4")
    assert slots_per_device(2, 1, 1, in_process=False) == 4
    monkeypatch.setenv(SLOTS_ENV, "two")
    with pytest.raises(ConfigError) as caught:
        slots_per_device("auto", 1, 1, in_process=False)
    assert str(caught.value) == (
        "EDGETUNE_GPU_SLOTS_PER_DEVICE='two' is not a number of trainings per GPU; set it to "
        "a whole number >= 1 (infra/workers.sh sets it for its gpu workers) or unset it"
    )


def test_trainings_take_the_lowest_free_slot_and_give_it_back(fake_gpus: dict[str, Any]) -> None:
    held = threading.Barrier(4)  # the three trainings and this thread
    release = threading.Event()
    seen: dict[str, GpuSlot | None] = {}

    def training(name: str) -> None:
        with gpu_slot("auto", 3, in_process=True) as slot:
            seen[name] = current_slot()
            assert seen[name] == slot
            held.wait(timeout=10)
            release.wait(timeout=10)

    threads = [threading.Thread(target=training, args=(n,)) for n in "abc"]
    for thread in threads:
        thread.start()
    held.wait(timeout=10)
    assert sorted(slot.index for slot in seen.values() if slot) == [0, 1, 2]
    assert {slot.per_device for slot in seen.values() if slot} == {2}  # 3 trainings, 2 GPUs
    assert current_slot() is None  # each thread's own: this one holds none
    release.set()
    for thread in threads:
        thread.join(timeout=10)
    with pytest.raises(RuntimeError, match="failed"), gpu_slot("auto", 3, in_process=True) as slot:
        assert slot.index == 0  # all three came back
        raise RuntimeError("the training failed")
    with gpu_slot("auto", 3, in_process=True) as slot:
        assert slot.index == 0  # a failed training gives its slot back too


def test_a_training_trains_on_its_slots_gpu(fake_gpus: dict[str, Any]) -> None:
    with gpu_slot(2, 4, in_process=True), gpu_slot(2, 4, in_process=True):
        with gpu_slot(2, 4, in_process=True) as third:
            assert third.index == 2
            assert resolve_device("auto") == torch.device("cuda", 1)
            assert resolve_device("cuda") == torch.device("cuda", 1)
            assert fake_gpus["set"] == [1, 1]  # the thread's current device
        assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    fake_gpus["current"] = 1  # outside a slot (a pinned worker): the current device
    assert resolve_device("auto") == torch.device("cuda", 1)


def test_a_training_may_use_its_share_of_the_gpu(fake_gpus: dict[str, Any]) -> None:
    gpu = torch.device("cuda", 0)
    assert device_budget(gpu) == 80 * GIB  # alone on it
    with gpu_slot(4, 4, in_process=True):
        assert device_budget(gpu) == 20 * GIB
        fake_gpus["free"] = 12 * GIB  # the others took more than their share
        assert device_budget(gpu) == 12 * GIB


def test_batch_size_auto_and_the_data_path_keep_to_the_share(
    fake_gpus: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = torch.device("cuda", 0)

    def fake_step(size: int) -> int:
        """A fake training step on the fake GPU: 1 GiB of activations per 64 images."""
        return size * GIB // 64

    alone = largest_fitting(fits_in_memory(fake_step, device_budget(gpu)), 8, 8192)
    with gpu_slot(4, 4, in_process=True):
        shared = largest_fitting(fits_in_memory(fake_step, device_budget(gpu)), 8, 8192)
        # a set of 6 GiB decoded: within a quarter of 80 GiB, not of 20
        assert not loaders.use_batched("auto", 6 * GIB, gpu, loaders.DEVICE_SHARE)
    assert (alone, shared) == (4096, 1024)
    assert loaders.use_batched("auto", 6 * GIB, gpu, loaders.DEVICE_SHARE)
    # what the probe leaves for the decoded set the batched path puts on the GPU
    data = DataConfig(root="unused", image_size=64)
    items = [(Path(f"{i}.png"), 0) for i in range(1000)]
    assert loaders.on_device_bytes(data, items, gpu) == 1000 * 3 * 64 * 64
    per_image = data.model_copy(update={"loader": "per_image"})
    assert loaders.on_device_bytes(per_image, items, gpu) == 0
    monkeypatch.setenv(SLOTS_ENV, "4")  # a gpu worker told by infra/workers.sh
    assert device_budget(gpu) == 20 * GIB


def test_parallel_beyond_the_slots_is_refused_before_the_study(
    fake_gpus: dict[str, Any], tmp_path: Path
) -> None:
    assert capacity_error("auto", 8, 1) is None
    assert capacity_error(2, 4, 2) is None
    assert capacity_error(4, 8, 0) is None  # no GPU: the CPU trains them all
    raw = tiny_config(tmp_path / "data", tmp_path / "run", study={"parallel": 5})
    raw["gpu"] = {"slots_per_device": 2}
    with pytest.raises(ConfigError) as caught:
        check_gpu_slots(parse_config(raw))
    assert str(caught.value) == (
        "study.parallel is 5 but this host has 2 GPU(s) x gpu.slots_per_device 2 = 4 slot(s); "
        "raise gpu.slots_per_device to 3 or lower study.parallel"
    )
    raw["gpu"] = {"slots_per_device": 3}
    check_gpu_slots(parse_config(raw))
    raw["orchestration"] = {"mode": "deployments"}  # slots are the gpu workers there
    raw["gpu"] = {"slots_per_device": 1}
    check_gpu_slots(parse_config(raw))
    with pytest.raises(ConfigError, match=r"gpu\.slots_per_device: Input should be greater"):
        parse_config({**raw, "gpu": {"slots_per_device": 0}})


class _Workload:
    """The trial's workload, replaced so the stage's own code runs around a training that
    only records the slot it was given."""

    study_objective = "minimize"

    def __init__(self) -> None:
        self.slots: list[GpuSlot | None] = []

    def pruning_warmup(self, params: dict[str, Any]) -> int:
        return 0

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.slots.append(current_slot())
        return trial_stages.TrainOutcome(metrics={}, started_at=0.0, finished_at=0.0)


@pytest.mark.parametrize("mode", ["local", "deployments"])
def test_the_train_stage_holds_a_slot_while_it_trains(
    fake_gpus: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str
) -> None:
    workload = _Workload()
    monkeypatch.setattr(trial_stages, "workload_for", lambda config: workload)
    monkeypatch.setattr(trial_stages, "epoch_reporter", lambda *a, **k: lambda *b: None)
    monkeypatch.setattr(trial_stages, "save_outcome", lambda *a, **k: None)
    monkeypatch.setattr(trial_stages, "stage_heartbeat", lambda *a: nullcontext(threading.Event()))
    raw = tiny_config(tmp_path / "data", tmp_path / "run", study={"parallel": 4})
    raw["orchestration"] = {"mode": mode}
    config = parse_config(raw)

    trial_stages.train_stage(config, 0, {}, "run", "parent")

    # local: 4 trainings over 2 GPUs; a gpu worker is one slot of its own
    assert workload.slots == [GpuSlot(0, 2 if mode == "local" else 1)]
    assert current_slot() is None and not gpus._taken


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_slots_train_at_once_on_a_real_gpu(digits16: dict[str, Any]) -> None:
    from tasks.config import AugmentConfig, TrainConfig
    from tasks.models import create_model
    from tasks.training.fmfp import train_fmfp
    from tasks.training.rng import build_model

    settings = TrainConfig(epochs=2, batch_size=64, swa_start=1, device="auto")
    data = DataConfig(root="unused", image_size=16, augment=AugmentConfig(rotation=10))
    results: dict[int, Any] = {}

    def training(seed: int) -> None:
        with gpu_slot(2, 2, in_process=True) as slot:
            device = resolve_device("auto")
            assert device == torch.device("cuda", slot.device_index(torch.cuda.device_count()))
            assert device_budget(device) <= torch.cuda.mem_get_info(device)[1] // 2
            batches = loaders.train_batches(data, digits16["items"], 64, seed=seed, device=device)
            model = build_model(seed, lambda: create_model("tinycnn", 10))
            results[seed] = train_fmfp(
                model, batches, digits16["val_x"], digits16["val_y"], settings
            )

    threads = [threading.Thread(target=training, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(results) == [0, 1]
    assert all(r.device.startswith("cuda") and len(r.history) == 2 for r in results.values())
    assert results[0].history[-1]["val_loss"] != results[1].history[-1]["val_loss"]
