"""Compiler seam: one conformance suite for every registered compiler, then specifics.

`onnxruntime-int8` runs for real. `hailo` runs against a FAKE Dataflow Compiler
(tests/fakes/fake_hailo.py): the real DFC is not installable here, so these tests check
how edgetune drives the SDK, not what the SDK makes of the model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tasks.compilers import (
    COMPILERS,
    CompiledArtifact,
    Compiler,
    CompilerError,
    CompilerUnavailableError,
    InvalidCalibrationError,
    available_compilers,
    create_compiler,
)
from tasks.compilers.hailo import HailoCompiler
from tasks.compilers.onnxruntime_int8 import OnnxRuntimeInt8Compiler

from fakes import (
    IMAGE_SIZE,
    export_onnx,
    fake_hailo,
    normalise_nchw,
    synthetic_images,
    tiny_classifier,
    torch_logits,
    write_bundle,
)

COMMON_METADATA = {"input_name", "input_shape", "output_name", "opset", "calibration_samples"}
BACKEND_METADATA = {
    "onnxruntime-int8": {"quantize_linear_nodes", "dequantize_linear_nodes"},
    "hailo": {"hw_arch", "model_script", "normalization", "sdk_version"},
}
FAKE_TOOLCHAIN = {"hailo"}  # compilers tested against a fake SDK


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compilers")


@pytest.fixture(scope="module")
def torch_model() -> Any:
    return tiny_classifier()


@pytest.fixture(scope="module")
def onnx_model(torch_model: Any, workdir: Path) -> Path:
    return export_onnx(torch_model, workdir / "model.onnx")


@pytest.fixture(scope="module")
def calibration(workdir: Path) -> Path:
    return write_bundle(workdir / "calibration.npz", n=48)


@pytest.fixture
def sdk(monkeypatch: pytest.MonkeyPatch) -> Any:
    """FAKE hailo_sdk_client in sys.modules for this test only."""
    module = fake_hailo.make_sdk_client()
    monkeypatch.setitem(sys.modules, "hailo_sdk_client", module)
    return module


@pytest.fixture
def no_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import hailo_sdk_client` fail even where a real DFC is installed."""
    monkeypatch.setitem(sys.modules, "hailo_sdk_client", None)


@pytest.fixture(params=sorted(COMPILERS))
def compiler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Compiler:
    """Every registered compiler, with a fake toolchain where the real one cannot exist."""
    name = request.param
    if name in FAKE_TOOLCHAIN:
        monkeypatch.setitem(sys.modules, "hailo_sdk_client", fake_hailo.make_sdk_client())
    elif name not in BACKEND_METADATA:
        pytest.fail(f"compiler {name!r} is registered but has no setup in this suite")
    return create_compiler(name)


def _leftovers(out_dir: Path) -> list[str]:
    """Hidden partial files a compile must not leave behind."""
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith("."))


class TestCompilerConformance:
    """The contract of tasks.compilers.base.Compiler, for every implementation."""

    def test_compile_writes_artifact_and_log(
        self, compiler: Compiler, onnx_model: Path, calibration: Path, tmp_path: Path
    ) -> None:
        artifact = compiler.compile(onnx_model, calibration, tmp_path / "out")

        assert isinstance(artifact, CompiledArtifact)
        assert artifact.path == tmp_path / "out" / f"model{compiler.artifact_suffix}"
        assert artifact.path.is_file()
        assert artifact.size_bytes == artifact.path.stat().st_size > 0
        assert artifact.runtime == type(compiler).runtime
        assert artifact.backend == compiler.name
        assert artifact.seconds > 0
        assert artifact.log_path == tmp_path / "out" / "compile.log"
        assert "calibration" in artifact.log_path.read_text()
        expected = COMMON_METADATA | BACKEND_METADATA[compiler.name]
        assert expected <= set(artifact.metadata)
        assert artifact.metadata["input_name"] == "input"
        assert artifact.metadata["input_shape"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
        assert artifact.metadata["calibration_samples"] == 48
        assert artifact.metadata["opset"] == 17
        assert _leftovers(tmp_path / "out") == []

    def test_wrong_image_size_is_refused(
        self, compiler: Compiler, onnx_model: Path, tmp_path: Path
    ) -> None:
        wrong = write_bundle(tmp_path / "calibration-20px.npz", n=8, size=20)

        with pytest.raises(InvalidCalibrationError) as caught:
            compiler.compile(onnx_model, wrong, tmp_path / "out")

        assert isinstance(caught.value, CompilerError)
        assert isinstance(caught.value, ValueError)
        message = str(caught.value)
        assert "20x20" in message and "16x16" in message and "rebuild" in message
        assert not list((tmp_path / "out").glob(f"*{compiler.artifact_suffix}"))
        assert _leftovers(tmp_path / "out") == []

    def test_missing_calibration_keys_are_refused(
        self, compiler: Compiler, onnx_model: Path, tmp_path: Path
    ) -> None:
        bad = tmp_path / "calibration.npz"
        np.savez(bad, images=synthetic_images(4))

        with pytest.raises(InvalidCalibrationError, match=r"lacks \['mean', 'std'\]"):
            compiler.compile(onnx_model, bad, tmp_path / "out")

    def test_missing_model_is_refused(
        self, compiler: Compiler, calibration: Path, tmp_path: Path
    ) -> None:
        with pytest.raises(FileNotFoundError, match="export it first"):
            compiler.compile(tmp_path / "absent.onnx", calibration, tmp_path / "out")


@pytest.fixture(scope="module")
def artifact(onnx_model: Path, calibration: Path, workdir: Path) -> CompiledArtifact:
    """The default onnxruntime-int8 compile of the tiny model."""
    return OnnxRuntimeInt8Compiler().compile(onnx_model, calibration, workdir / "int8")


class TestOnnxRuntimeInt8:
    def test_artifact_is_qdq_int8(self, artifact: CompiledArtifact) -> None:
        graph = onnx.load(str(artifact.path)).graph
        ops = [n.op_type for n in graph.node]
        assert ops.count("QuantizeLinear") == artifact.metadata["quantize_linear_nodes"] > 0
        assert ops.count("DequantizeLinear") == artifact.metadata["dequantize_linear_nodes"] > 0
        initializers = {t.name: t for t in graph.initializer}
        dequantized = [
            initializers[n.input[0]]
            for n in graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in initializers
        ]
        conv_weights = [t for t in dequantized if len(t.dims) == 4]
        assert conv_weights, "the conv weight is stored quantized"
        assert {t.data_type for t in conv_weights} == {onnx.TensorProto.INT8}  # signed

    def test_logits_close_to_float_model(
        self, artifact: CompiledArtifact, torch_model: Any, calibration: Path
    ) -> None:
        images = np.load(calibration)["images"]
        session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
        int8 = session.run(None, {"input": normalise_nchw(images)})[0].astype(np.float64)
        ref = torch_logits(torch_model, images)

        assert int8.shape == ref.shape == (len(images), 3)
        agreement = float(np.mean(int8.argmax(1) == ref.argmax(1)))
        assert agreement >= 0.8
        assert np.abs(int8 - ref).max() <= 0.05 * np.abs(ref).max()
        assert not np.allclose(int8, ref, atol=1e-6)  # it really is quantized

    def test_log_records_quantization(self, artifact: CompiledArtifact) -> None:
        log = artifact.log_path.read_text() if artifact.log_path else ""
        assert "quant_pre_process" in log
        assert "quantize_static: QDQ, per_channel=True, calibrate=minmax" in log
        assert "onnx.checker passed" in log

    @pytest.mark.parametrize("method", ["entropy", "percentile"])
    def test_other_calibration_methods(
        self, method: str, onnx_model: Path, calibration: Path, tmp_path: Path
    ) -> None:
        compiler = create_compiler("onnxruntime-int8", calibrate_method=method)
        artifact = compiler.compile(onnx_model, calibration, tmp_path)
        assert artifact.metadata["options"]["calibrate_method"] == method
        assert artifact.metadata["quantize_linear_nodes"] > 0
        log = artifact.log_path.read_text()  # type: ignore[union-attr]
        assert f"using '{method}' algorithm" in log  # onnxruntime's print()s are captured

    def test_parallel_compilations_leave_stdout_alone(
        self,
        onnx_model: Path,
        calibration: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A study compiles in threads; capturing onnxruntime's print()s swaps sys.stdout
        process-wide, so two overlapping captures would leave it pointing at a buffer."""
        import sys
        import threading
        import time

        original = OnnxRuntimeInt8Compiler._quantize
        windows: list[tuple[float, float]] = []

        def timed(self: Any, *args: Any) -> None:
            started = time.monotonic()
            original(self, *args)
            time.sleep(0.2)  # hold the capture open long enough for the threads to meet
            windows.append((started, time.monotonic()))

        monkeypatch.setattr(OnnxRuntimeInt8Compiler, "_quantize", timed)
        stdout = sys.stdout
        compiler = create_compiler("onnxruntime-int8", calibrate_method="entropy")
        artifacts: dict[int, CompiledArtifact] = {}

        def run(i: int) -> None:
            artifacts[i] = compiler.compile(onnx_model, calibration, tmp_path / str(i))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sys.stdout is stdout
        first, second = sorted(windows)
        assert first[1] <= second[0]  # the captures took turns
        for artifact in artifacts.values():
            log = artifact.log_path.read_text()  # type: ignore[union-attr]
            assert "using 'entropy' algorithm" in log  # each kept its own print()s

    def test_max_calibration_samples(
        self, onnx_model: Path, calibration: Path, tmp_path: Path
    ) -> None:
        compiler = OnnxRuntimeInt8Compiler(max_calibration_samples=10)
        artifact = compiler.compile(onnx_model, calibration, tmp_path)
        assert artifact.metadata["calibration_samples"] == 10

    def test_fixed_batch_model(self, torch_model: Any, calibration: Path, tmp_path: Path) -> None:
        fixed = export_onnx(torch_model, tmp_path / "fixed.onnx", dynamic_batch=False)
        artifact = OnnxRuntimeInt8Compiler().compile(fixed, calibration, tmp_path / "out")
        assert artifact.metadata["input_shape"] == [1, 3, IMAGE_SIZE, IMAGE_SIZE]
        assert "calibration batch 1" in artifact.log_path.read_text()  # type: ignore[union-attr]

    def test_preprocess_failure_falls_back(
        self,
        onnx_model: Path,
        calibration: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("symbolic shape inference exploded")

        monkeypatch.setattr("onnxruntime.quantization.quant_pre_process", broken)
        artifact = OnnxRuntimeInt8Compiler().compile(onnx_model, calibration, tmp_path)
        log = artifact.log_path.read_text()  # type: ignore[union-attr]
        assert "quant_pre_process failed (RuntimeError: symbolic shape inference exploded)" in log
        assert artifact.metadata["quantize_linear_nodes"] > 0

    @pytest.mark.parametrize(
        ("option", "value"),
        [("calibrate_method", "median"), ("activation_type", "int4")],
    )
    def test_bad_options_list_the_choices(self, option: str, value: str) -> None:
        with pytest.raises(ValueError, match=rf"{option}='{value}'.*use one of"):
            create_compiler("onnxruntime-int8", **{option: value})


class TestHailoWithFakeSdk:
    """Against the FAKE DFC (tests/fakes/fake_hailo.py); see the module docstring."""

    def test_call_sequence_script_and_calibration(
        self, sdk: Any, onnx_model: Path, calibration: Path, tmp_path: Path
    ) -> None:
        compiler = HailoCompiler(
            hw_arch="hailo8l",
            optimization_level=3,
            compression_level=1,
            calibration_batch_size=4,
            extra_model_script="performance_param(compiler_optimization_level=max)",
        )
        artifact = compiler.compile(onnx_model, calibration, tmp_path)

        assert [name for name, _ in sdk.calls] == [
            "__init__",
            "translate_onnx_model",
            "load_model_script",
            "optimize_full_precision",
            "optimize",
            "compile",
        ]
        args = dict(sdk.calls)
        assert args["__init__"] == {"hw_arch": "hailo8l"}
        translate = args["translate_onnx_model"]
        assert translate["model"] == str(onnx_model)
        assert translate["net_name"] == "model"
        assert translate["start_node_names"] == ["input"]
        assert translate["net_input_shapes"] == {"input": [1, 3, IMAGE_SIZE, IMAGE_SIZE]}
        script = args["load_model_script"]["script"].splitlines()
        assert script == [
            "normalization1 = normalization([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])",
            "model_optimization_flavor(optimization_level=3, compression_level=1, batch_size=4)",
            "performance_param(compiler_optimization_level=max)",
        ]
        assert args["optimize"] == {"shape": (48, IMAGE_SIZE, IMAGE_SIZE, 3), "dtype": "float32"}
        images = np.load(calibration)["images"]
        np.testing.assert_array_equal(sdk.runners[0].calibration, images.astype(np.float32))
        assert artifact.path.read_bytes().startswith(fake_hailo.FAKE_HEF_MAGIC)
        assert artifact.path.name == "model.hef"
        assert artifact.runtime == "hailort"
        assert artifact.metadata["hw_arch"] == "hailo8l"
        assert artifact.metadata["sdk_version"] == "0.0.0+fake"

    def test_sdk_logging_goes_to_compile_log(
        self, sdk: Any, onnx_model: Path, calibration: Path, tmp_path: Path
    ) -> None:
        artifact = HailoCompiler().compile(onnx_model, calibration, tmp_path)
        log = artifact.log_path.read_text()  # type: ignore[union-attr]
        assert "hailo_sdk_client.fake: [fake DFC] optimize" in log
        assert "normalization1 = normalization(" in log

    def test_failure_in_optimize_is_a_compiler_error(
        self, sdk: Any, onnx_model: Path, calibration: Path, tmp_path: Path
    ) -> None:
        sdk.fail_in = "optimize"

        with pytest.raises(CompilerError) as caught:
            HailoCompiler().compile(onnx_model, calibration, tmp_path)

        message = str(caught.value)
        assert "compiler 'hailo' failed" in message
        assert "fake SDK failure injected in optimize" in message
        assert "last lines of" in message and "[fake DFC] optimize" in message  # log tail
        assert [name for name, _ in sdk.calls][-1] == "optimize"
        assert not list(tmp_path.glob("*.hef"))
        assert _leftovers(tmp_path) == []
        assert (tmp_path / "compile.log").is_file()

    def test_without_sdk_says_what_to_install(
        self, no_sdk: None, onnx_model: Path, calibration: Path, tmp_path: Path
    ) -> None:
        with pytest.raises(CompilerUnavailableError) as caught:
            HailoCompiler().compile(onnx_model, calibration, tmp_path)

        message = str(caught.value)
        assert "Hailo AI Software Suite" in message
        assert "onnxruntime-int8" in message
        assert "\n" not in message
        assert not (tmp_path / "compile.log").exists()

    @pytest.mark.parametrize(
        ("option", "value", "match"),
        [
            ("hw_arch", "jetson", "not a Hailo architecture"),
            ("optimization_level", 7, r"optimization_level=7 is out of range; use 0..4"),
            ("compression_level", -1, r"compression_level=-1 is out of range; use 0..5"),
            ("calibration_batch_size", 0, "use 1 or more"),
        ],
    )
    def test_bad_options(self, option: str, value: Any, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            HailoCompiler(**{option: value})


class TestRegistry:
    def test_registry_names(self) -> None:
        assert set(COMPILERS) == {"onnxruntime-int8", "hailo"}
        for name, cls in COMPILERS.items():
            assert cls.name == name

    def test_unknown_name_lists_known_names(self) -> None:
        with pytest.raises(ValueError) as caught:
            create_compiler("nope")
        message = str(caught.value)
        assert "'nope'" in message and "'hailo'" in message and "'onnxruntime-int8'" in message

    def test_factory_passes_options(self) -> None:
        compiler = create_compiler("onnxruntime-int8", per_channel=False)
        assert isinstance(compiler, OnnxRuntimeInt8Compiler)
        assert compiler.options()["per_channel"] is False

    def test_available_compilers(self, no_sdk: None) -> None:
        assert available_compilers() == ["onnxruntime-int8"]

    def test_available_compilers_with_sdk(self, sdk: Any) -> None:
        assert available_compilers() == ["hailo", "onnxruntime-int8"]
