"""Device seam: one conformance suite for every runner, then the evaluator itself.

The runner suite is parametrised by `RUNNER_OPTIONS`: every registered runner must have an
entry. `ssh` runs against a real SSH server on 127.0.0.1 (tests/board.py: OpenSSH's sshd
when installed, else an in-process asyncssh server), one per module. The evaluator's HailoRT path runs against a FAKE
`hailo_platform` (tests/fakes/fake_hailo.py), since no Hailo board is attached here.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tasks.compilers import CompiledArtifact, create_compiler
from tasks.devices import (
    RUNNERS,
    DeviceError,
    DeviceResult,
    DeviceRunner,
    create_runner,
    edgetune_eval,
    evaluator_path,
    evaluator_version,
)

from board import Board, start_board
from fakes import (
    CLASSES,
    export_onnx,
    fake_hailo,
    normalise_nchw,
    tiny_classifier,
    torch_logits,
    write_bundle,
)

N_IMAGES = 21  # not a multiple of the batch sizes below: the last batch is partial
RESULT_KEYS = {
    "evaluator_version",
    "runtime",
    "runtime_version",
    "accelerator",
    "n",
    "batch_size",
    "latency_ms",
    "throughput_fps",
    "started_at",
    "finished_at",
    "model_sha256",
    "bundle_sha256",
}
LATENCY_KEYS = {"mean", "p50", "p95", "min", "max"}
RUNNER_OPTIONS: dict[str, dict[str, Any]] = {
    "local": {"warmup": 1, "timeout_s": 60},
    "ssh": {"warmup": 1, "timeout_s": 60},  # + the board's connection options
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def _result_files(root: Path) -> list[Path]:
    return [*root.rglob("probs.npy"), *root.rglob("result.json")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devices")


@pytest.fixture(scope="module")
def torch_model() -> Any:
    return tiny_classifier()


@pytest.fixture(scope="module")
def float_onnx(torch_model: Any, workdir: Path) -> Path:
    return export_onnx(torch_model, workdir / "model.onnx")


@pytest.fixture(scope="module")
def bundle(workdir: Path) -> Path:
    return write_bundle(workdir / "bundle.npz", n=N_IMAGES, seed=7)


@pytest.fixture(scope="module")
def int8(float_onnx: Path, workdir: Path) -> CompiledArtifact:
    calibration = write_bundle(workdir / "calibration.npz", n=32, seed=3)
    return create_compiler("onnxruntime-int8").compile(float_onnx, calibration, workdir / "int8")


@pytest.fixture(scope="module")
def ssh_board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    with start_board(tmp_path_factory.mktemp("ssh-board")) as board:
        yield board


@pytest.fixture(params=sorted(RUNNERS))
def runner_name(request: pytest.FixtureRequest) -> str:
    if request.param not in RUNNER_OPTIONS:
        pytest.fail(f"runner {request.param!r} is registered but has no options in this suite")
    return str(request.param)


@pytest.fixture
def runner_options(runner_name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The suite's options for this runner, plus where to reach the device."""
    options = dict(RUNNER_OPTIONS[runner_name])
    if runner_name == "ssh":
        board: Board = request.getfixturevalue("ssh_board")
        options = board.runner_options(**options)
    return options


@pytest.fixture
def runner(runner_name: str, runner_options: dict[str, Any]) -> DeviceRunner:
    return create_runner(runner_name, **runner_options)


class TestRunnerConformance:
    """The contract of tasks.devices.base.DeviceRunner, for every implementation."""

    def test_float_onnx_matches_torch(
        self, runner: DeviceRunner, float_onnx: Path, bundle: Path, torch_model: Any, tmp_path: Path
    ) -> None:
        result = runner.evaluate(float_onnx, bundle, tmp_path)

        images = np.load(bundle)["images"]
        expected = _softmax(torch_logits(torch_model, images))
        assert isinstance(result, DeviceResult)
        assert result.probs.shape == (N_IMAGES, len(CLASSES))
        assert result.probs.dtype == np.float32
        np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(result.probs, expected, atol=1e-4)

    def test_result_metadata(
        self, runner: DeviceRunner, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        result = runner.evaluate(float_onnx, bundle, tmp_path)

        info = result.info
        assert set(info) >= RESULT_KEYS
        assert info["evaluator_version"] == evaluator_version() == "0.2.0"
        assert info["runtime"] == "onnxruntime"
        assert info["runtime_version"] == ort.__version__
        assert info["accelerator"] == "cpu"
        assert info["n"] == N_IMAGES
        assert info["batch_size"] == 1
        assert info["model_sha256"] == _sha256(float_onnx)
        assert info["bundle_sha256"] == _sha256(bundle)
        assert set(result.latency_ms) == LATENCY_KEYS
        assert all(v > 0 for v in result.latency_ms.values())
        lat = result.latency_ms
        assert lat["min"] <= lat["p50"] <= lat["p95"] <= lat["max"]
        assert lat["min"] <= lat["mean"] <= lat["max"]
        # one timed call per image at batch size 1, so fps = n / (n * mean latency)
        assert result.throughput_fps == pytest.approx(1000.0 / lat["mean"], rel=1e-6)
        assert result.started_at <= result.finished_at
        assert result.finished_at - result.started_at < 60

    def test_int8_artifact(
        self,
        runner: DeviceRunner,
        int8: CompiledArtifact,
        float_onnx: Path,
        bundle: Path,
        tmp_path: Path,
    ) -> None:
        quantized = runner.evaluate(int8.path, bundle, tmp_path / "int8")
        reference = runner.evaluate(float_onnx, bundle, tmp_path / "float")

        assert quantized.probs.shape == (N_IMAGES, len(CLASSES))
        np.testing.assert_allclose(quantized.probs.sum(axis=1), 1.0, atol=1e-5)
        agreement = np.mean(quantized.probs.argmax(1) == reference.probs.argmax(1))
        assert agreement >= 0.8
        # the runner returns what the INT8 model computes (quantization error included)
        session = ort.InferenceSession(str(int8.path), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": normalise_nchw(np.load(bundle)["images"])})[0]
        np.testing.assert_allclose(quantized.probs, _softmax(logits.astype(np.float64)), atol=1e-5)
        assert quantized.info["model_sha256"] == _sha256(int8.path)

    def test_batch_size_does_not_change_probs(
        self,
        runner_name: str,
        runner_options: dict[str, Any],
        float_onnx: Path,
        bundle: Path,
        tmp_path: Path,
    ) -> None:
        options = {**runner_options, "batch_size": 4}
        batched = create_runner(runner_name, **options).evaluate(
            float_onnx, bundle, tmp_path / "b4"
        )
        single = create_runner(runner_name, **runner_options).evaluate(
            float_onnx, bundle, tmp_path / "b1"
        )

        assert batched.info["batch_size"] == 4
        np.testing.assert_allclose(batched.probs, single.probs, atol=1e-6)

    def test_info_reports_runtimes(self, runner: DeviceRunner) -> None:
        info = runner.info()

        assert info["evaluator_version"] == evaluator_version()
        assert info["runtimes"]["onnxruntime"] == ort.__version__
        assert "hailort" in info["runtimes"]
        assert info["numpy"] == np.__version__
        assert isinstance(info["accelerators"], list)
        assert info["hostname"] and info["machine"]

    def test_corrupt_model(self, runner: DeviceRunner, bundle: Path, tmp_path: Path) -> None:
        corrupt = tmp_path / "corrupt.onnx"
        corrupt.write_bytes(b"this is not a protobuf")

        with pytest.raises(DeviceError) as caught:
            runner.evaluate(corrupt, bundle, tmp_path / "work")

        message = str(caught.value)
        assert "exit code 1" in message
        assert "edgetune_eval: error: onnxruntime cannot load" in message
        assert "corrupt.onnx" in message
        assert "Traceback" not in message  # one line unless --debug
        assert _result_files(tmp_path) == []

    def test_stale_results_do_not_survive_a_failure(
        self, runner: DeviceRunner, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        runner.evaluate(float_onnx, bundle, tmp_path)
        assert len(_result_files(tmp_path)) == 2
        corrupt = tmp_path / "corrupt.onnx"
        corrupt.write_bytes(b"garbage")

        with pytest.raises(DeviceError):
            runner.evaluate(corrupt, bundle, tmp_path)

        assert _result_files(tmp_path) == []

    @pytest.mark.skipif(
        importlib.util.find_spec("hailo_platform") is not None,
        reason="HailoRT is installed here, so it is not missing",
    )
    def test_missing_hailort(self, runner: DeviceRunner, bundle: Path, tmp_path: Path) -> None:
        hef = tmp_path / "model.hef"
        hef.write_bytes(fake_hailo.FAKE_HEF_MAGIC)

        with pytest.raises(DeviceError) as caught:
            runner.evaluate(hef, bundle, tmp_path / "work")

        message = str(caught.value)
        assert "exit code 3" in message
        assert "HailoRT" in message and "hailo_platform" in message
        assert _result_files(tmp_path) == []

    def test_class_count_mismatch(
        self, runner: DeviceRunner, float_onnx: Path, tmp_path: Path
    ) -> None:
        five = write_bundle(tmp_path / "five.npz", n=6, classes=np.array(list("abcde")))

        with pytest.raises(DeviceError, match="outputs 3 classes but the bundle lists 5"):
            runner.evaluate(float_onnx, five, tmp_path / "work")
        assert _result_files(tmp_path) == []

    def test_onnx_input_size_differs_from_the_bundle(
        self, runner: DeviceRunner, float_onnx: Path, tmp_path: Path
    ) -> None:
        larger = write_bundle(tmp_path / "24px.npz", n=4, size=24)

        with pytest.raises(DeviceError) as caught:
            runner.evaluate(float_onnx, larger, tmp_path / "work")

        first = str(caught.value).splitlines()[0]  # what a trial's fail reason shows
        assert "failed with exit code 1: edgetune_eval: error: model input input " in first
        assert "['batch', 3, 16, 16] does not fit bundle images 24x24x3" in first
        assert "export the model at the bundle's size (data.image_size=24)" in first
        assert _result_files(tmp_path) == []

    def test_missing_inputs(self, runner: DeviceRunner, bundle: Path, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="compiled artifact"):
            runner.evaluate(tmp_path / "absent.onnx", bundle, tmp_path)

    def test_staged_inputs_are_on_the_device_until_the_block_ends(
        self, runner: DeviceRunner, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        reference = runner.evaluate(float_onnx, bundle, tmp_path / "whole")

        with runner.stage(float_onnx, bundle) as staged:
            location = Path(staged.location)  # the device shares this filesystem here
            assert (location / float_onnx.name).read_bytes() == float_onnx.read_bytes()
            first = staged.evaluate(tmp_path / "a")
            again = staged.evaluate(tmp_path / "b")  # a staging can run more than once

        assert not location.exists()
        np.testing.assert_allclose(first.probs, reference.probs, atol=1e-6)
        np.testing.assert_allclose(again.probs, reference.probs, atol=1e-6)
        assert first.info["model_sha256"] == _sha256(float_onnx)

    def test_a_failure_in_the_staged_block_removes_the_run_folder(
        self, runner: DeviceRunner, float_onnx: Path, bundle: Path, tmp_path: Path
    ) -> None:
        corrupt = tmp_path / "corrupt.onnx"
        corrupt.write_bytes(b"not a model")

        busy = pytest.raises(RuntimeError, match="board stayed busy")  # e.g. BoardBusyError
        with busy, runner.stage(float_onnx, bundle) as staged:
            waited = Path(staged.location)
            raise RuntimeError("board stayed busy")
        bad = pytest.raises(DeviceError, match="onnxruntime cannot load")
        with bad, runner.stage(corrupt, bundle) as staged:
            failed = Path(staged.location)
            staged.evaluate(tmp_path / "work")

        assert not waited.exists() and not failed.exists()
        assert _result_files(tmp_path) == []

    def test_staging_missing_inputs_sends_nothing(
        self, runner: DeviceRunner, bundle: Path, tmp_path: Path
    ) -> None:
        missing = pytest.raises(FileNotFoundError, match="compiled artifact")
        with missing, runner.stage(tmp_path / "absent.onnx", bundle):
            pytest.fail("staged an artifact that does not exist")


class TestLocalRunner:
    def test_timeout_kills_the_evaluator(
        self, float_onnx: Path, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        started: list[subprocess.Popen[str]] = []

        class RecordingPopen(subprocess.Popen[str]):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                started.append(self)

        monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
        runner = create_runner("local", timeout_s=0.5, warmup=10_000_000)  # never finishes

        with pytest.raises(DeviceError, match=r"timed out after 0.5s.*raise device.timeout_s"):
            runner.evaluate(float_onnx, bundle, tmp_path)

        assert len(started) == 1
        assert started[0].returncode is not None  # killed and reaped
        assert _result_files(tmp_path) == []

    def test_python_without_runtime(self, tmp_path: Path, bundle: Path) -> None:
        runner = create_runner("local", python=str(tmp_path / "no-such-python"))
        artifact = tmp_path / "m.onnx"
        artifact.write_bytes(b"x")
        with pytest.raises(DeviceError, match="cannot start the evaluator"):
            runner.evaluate(artifact, bundle, tmp_path / "work")

    def test_bad_options(self) -> None:
        with pytest.raises(ValueError, match="timeout_s must be > 0"):
            create_runner("local", timeout_s=0)

    def test_unknown_runner_lists_known(self) -> None:
        with pytest.raises(ValueError, match=r"unknown device runner 'usb'.*\['local', 'ssh'\]"):
            create_runner("usb")


class TestEvaluatorProgram:
    """The shipped single file: its imports, CLI, maths and the (fake) HailoRT path."""

    def test_imports_only_stdlib_numpy_and_runtimes(self) -> None:
        tree = ast.parse(evaluator_path().read_text())
        in_functions = {
            id(inner)
            for func in ast.walk(tree)
            if isinstance(func, ast.FunctionDef)
            for inner in ast.walk(func)
        }
        top_level: set[str] = set()
        lazy: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                target = lazy if id(node) in in_functions else top_level
                target.update(n.split(".")[0] for n in names)
        assert top_level - set(sys.stdlib_module_names) == {"numpy"}
        assert lazy - set(sys.stdlib_module_names) == {"onnxruntime", "hailo_platform"}
        assert evaluator_path().name == "edgetune_eval.py"
        assert edgetune_eval.__version__ == "0.2.0"

    def test_softmax_and_latency_stats(self) -> None:
        probs = edgetune_eval.softmax(np.array([[0.0, 0.0], [1000.0, 0.0]]))
        np.testing.assert_allclose(probs, [[0.5, 0.5], [1.0, 0.0]])
        assert probs.dtype == np.float32
        stats = edgetune_eval.latency_stats([0.001, 0.002, 0.003])
        assert stats == pytest.approx({"mean": 2.0, "p50": 2.0, "p95": 2.9, "min": 1.0, "max": 3.0})

    def test_unknown_suffix(
        self, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        model = tmp_path / "model.tflite"
        model.write_bytes(b"x")
        argv = ["classify", "--model", str(model), "--bundle", str(bundle), "--out", str(tmp_path)]

        assert edgetune_eval.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "cannot tell the runtime of model.tflite" in err

    def test_onnx_input_size_mismatch_is_one_line(
        self, float_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        larger = write_bundle(tmp_path / "24px.npz", n=4, size=24)
        out = tmp_path / "out"
        argv = ["classify", "--model", str(float_onnx), "--bundle", str(larger), "--out", str(out)]

        assert edgetune_eval.main(argv) == 1
        err = capsys.readouterr().err
        assert err == (
            "edgetune_eval: error: model input input ['batch', 3, 16, 16] does not fit bundle "
            "images 24x24x3 (NCHW expected); export the model at the bundle's size "
            "(data.image_size=24) or rebuild the bundle at the model's input size\n"
        )
        assert _result_files(out) == []

    def test_debug_prints_traceback(
        self, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        model = tmp_path / "model.onnx"
        model.write_bytes(b"garbage")
        argv = ["classify", "--model", str(model), "--bundle", str(bundle), "--out", str(tmp_path)]

        assert edgetune_eval.main([*argv, "--debug"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err
        assert err.strip().splitlines()[-1].startswith("edgetune_eval: error: onnxruntime")

    def test_hef_on_fake_hailort(
        self,
        bundle: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        hailort = fake_hailo.make_hailort()
        monkeypatch.setitem(sys.modules, "hailo_platform", hailort)
        hef = tmp_path / "model.hef"
        hef.write_bytes(fake_hailo.FAKE_HEF_MAGIC)
        out = tmp_path / "out"
        argv = ["classify", "--model", str(hef), "--bundle", str(bundle), "--out", str(out)]

        assert edgetune_eval.main([*argv, "--batch-size", "4", "--warmup", "2"]) == 0

        images = np.load(bundle)["images"]
        expected = _softmax(np.stack([fake_hailo.fake_logits(i) for i in images]))
        probs = np.load(out / "probs.npy")
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        result = json.loads((out / "result.json").read_text())
        assert result["runtime"] == "hailort"
        assert result["runtime_version"] == "4.99.0+fake"
        assert result["accelerator"] == f"hailo:{fake_hailo.FAKE_DEVICE_ID}"
        # 2 warmup batches + ceil(21 / 4) = 6 timed batches, the last one partial
        assert hailort.events[0] == "vdevice acquired"
        assert hailort.events[1:-2] == ["run 4"] * 7 + ["run 1"]
        assert hailort.events[-2:] == ["configured released", "vdevice released"]
        assert "21 samples on hailort" in capsys.readouterr().out

    def test_info_with_fake_hailort(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setitem(sys.modules, "hailo_platform", fake_hailo.make_hailort())

        assert edgetune_eval.main(["info"]) == 0

        report = json.loads(capsys.readouterr().out)
        assert report["runtimes"] == {"onnxruntime": ort.__version__, "hailort": "4.99.0+fake"}
        assert report["accelerators"] == [
            {"type": "hailo", "id": fake_hailo.FAKE_DEVICE_ID, "arch": fake_hailo.FAKE_ARCH}
        ]

    def test_hef_input_shape_mismatch(
        self, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(sys.modules, "hailo_platform", fake_hailo.make_hailort((32, 32, 3)))
        hef = tmp_path / "model.hef"
        hef.write_bytes(fake_hailo.FAKE_HEF_MAGIC)
        argv = ["classify", "--model", str(hef), "--bundle", str(bundle), "--out", str(tmp_path)]

        with pytest.raises(edgetune_eval.EvalError, match=r"HEF input shape \(32, 32, 3\)"):
            edgetune_eval.classify(edgetune_eval.build_parser().parse_args(argv))
        hailort = sys.modules["hailo_platform"]
        assert isinstance(hailort, types.ModuleType)
        assert hailort.events[-1] == "vdevice released"  # released on failure too
