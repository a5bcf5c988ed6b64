"""Model factory, FMFP training (SAM + SWA) and ONNX export with its parity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tasks.config import AugmentConfig, TrainConfig
from tasks.data import inspect_dataset, load_bundle, make_bundle
from tasks.export import ExportError, export_checked, onnx_parity
from tasks.models import ARCHITECTURES, ModelError, create_model
from tasks.training.fmfp import train_fmfp
from tasks.training.loaders import bundle_tensors, train_loader
from tasks.training.rng import build_model
from tasks.training.sam import SAM


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_builds_with_the_asked_head(arch: str) -> None:
    model = create_model(arch, 3)
    size = 32 if arch == "tinycnn" else 64
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, size, size))
    assert out.shape == (2, 3)


def test_local_weights_load_and_head_only_finetune(tmp_path: Path) -> None:
    source = create_model("tinycnn", 10)
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": source.state_dict()}, weights)
    model = create_model("tinycnn", 4, weights=weights, finetune="head")
    assert torch.equal(model.features[0][0].weight, source.features[0][0].weight)
    assert model.head.out_features == 4  # a 10-class head does not fit 4 classes: replaced
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    same = create_model("tinycnn", 10, weights=weights)
    assert torch.equal(same.head.weight, source.head.weight)  # a fitting head is kept


def test_bad_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        create_model("tinycnn", 2, weights=tmp_path / "none.pt")
    other = tmp_path / "resnet.pt"
    torch.save(create_model("resnet18", 2).state_dict(), other)
    with pytest.raises(ModelError, match=r"does not fit this architecture: .*same model\.arch"):
        create_model("tinycnn", 2, weights=other)


def test_sam_moves_to_the_neighbour_and_back() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    start = [p.detach().clone() for p in layer.parameters()]
    optimizer = SAM(layer.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    layer(torch.ones(4, 3)).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    norm = torch.norm(torch.stack([g.norm() for g in grads]))
    optimizer.first_step()
    for p, s, g in zip(layer.parameters(), start, grads, strict=True):
        assert torch.allclose(p, s + 0.5 * g / norm, atol=1e-6)
    optimizer.zero_grad()
    layer(torch.ones(4, 3)).sum().backward()  # the gradient of a linear sum is the same
    optimizer.second_step()
    for p, s, g in zip(layer.parameters(), start, grads, strict=True):
        assert torch.allclose(p, s - 0.1 * g, atol=1e-6)


@pytest.fixture(scope="module")
def small_task(digits_root: Path, tmp_path_factory: pytest.TempPathFactory):
    info = inspect_dataset(digits_root, verify_images=False)
    bundle = make_bundle(
        info.files["val"], info.classes, 16, tmp_path_factory.mktemp("b") / "val.npz"
    )
    val_x, val_y = bundle_tensors(load_bundle(bundle))
    return info, val_x, val_y


def _train(small_task, seed: int = 0, epochs: int = 3, swa_start: int = 1, reports=None):
    info, val_x, val_y = small_task
    loader = train_loader(info.files["train"], 16, AugmentConfig(rotation=0), 128, seed=seed)
    params = TrainConfig(
        epochs=epochs, batch_size=128, lr=0.05, swa_start=swa_start, swa_lr=0.02, device="cpu"
    )
    on_epoch = (lambda e, row: reports.append((e, row))) if reports is not None else None
    model = build_model(seed, lambda: create_model("tinycnn", 10))
    return train_fmfp(model, loader, val_x, val_y, params, on_epoch=on_epoch)


def test_fmfp_learns_reports_each_epoch_and_is_reproducible(small_task) -> None:
    reports: list = []
    first = _train(small_task, reports=reports)
    assert [e for e, _ in reports] == [0, 1, 2]
    assert all(0.0 <= row["val_augrc"] <= 0.5 for _, row in reports)
    assert first.metrics["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert first.metrics["augrc"] == reports[-1][1]["val_augrc"]
    second = _train(small_task)
    assert second.metrics["augrc"] == pytest.approx(first.metrics["augrc"], abs=1e-9)
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_swa_result_is_the_average(small_task) -> None:
    result = _train(small_task, epochs=2, swa_start=1)
    # With one SWA epoch the average equals the last weights; BatchNorm statistics are refreshed.
    bn = result.model.features[0][1]
    assert bn.num_batches_tracked.item() > 0
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_swa_start_must_leave_an_epoch(small_task) -> None:
    with pytest.raises(ValueError, match=r"swa_start must be in \[0, epochs\)"):
        _train(small_task, epochs=2, swa_start=2)


def test_onnx_export_matches_pytorch(small_task, tmp_path: Path) -> None:
    _, val_x, _ = small_task
    model = create_model("tinycnn", 10).eval()
    result = export_checked(model, tmp_path / "m.onnx", 16, val_x[:8].numpy())
    assert result.max_abs_diff < 1e-4
    graph = onnx.load(str(result.path))
    onnx.checker.check_model(graph)
    dims = [d.dim_value or d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 16, 16]
    assert not list(tmp_path.glob("*.data"))  # one file, no external weights


def test_onnx_input_shape_mismatch_is_named(small_task, tmp_path: Path) -> None:
    model = create_model("tinycnn", 10).eval()
    path = export_checked(model, tmp_path / "m.onnx", 16, np.zeros((2, 3, 16, 16), np.float32)).path
    with pytest.raises(
        ExportError,
        match=r"expects input shape \['batch', 3, 16, 16\], but the data is \[2, 3, 24, 24\]",
    ):
        onnx_parity(model, path, np.zeros((2, 3, 24, 24), np.float32))


def test_exports_from_parallel_threads_do_not_collide(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    batch = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)

    def export(index: int) -> float:
        model = create_model("tinycnn", 10).eval()
        return export_checked(model, tmp_path / f"m{index}.onnx", 16, batch).max_abs_diff

    with ThreadPoolExecutor(4) as pool:
        diffs = list(pool.map(export, range(12)))
    assert len(diffs) == 12 and max(diffs) < 1e-4


def test_config_knows_every_architecture_without_importing_torch() -> None:
    import subprocess
    import sys

    from tasks.config import MODEL_ARCHS

    assert set(MODEL_ARCHS) == set(ARCHITECTURES)
    # Stage flows that only parse a config (compile, device) must not pay for torch.
    probe = "import sys, tasks.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested above)"
)
def test_fmfp_trains_on_cuda_with_bf16(small_task) -> None:
    info, val_x, val_y = small_task
    loader = train_loader(info.files["train"], 16, AugmentConfig(rotation=0), 128, seed=0)
    params = TrainConfig(
        epochs=3, batch_size=128, lr=0.05, swa_start=1, swa_lr=0.02, device="cuda", amp=True
    )
    model = build_model(0, lambda: create_model("tinycnn", 10))
    result = train_fmfp(model, loader, val_x, val_y, params)
    assert result.device.startswith("cuda")
    assert result.metrics["accuracy"] > 0.5
    assert next(result.model.parameters()).device.type == "cpu"  # returned ready to export
