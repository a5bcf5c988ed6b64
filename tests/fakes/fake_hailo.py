"""FAKE Hailo software for tests: NOT the Hailo Dataflow Compiler, NOT HailoRT.

The real packages cannot be installed here: the Dataflow Compiler (`hailo_sdk_client`)
comes only with Hailo's AI Software Suite from the Hailo Developer Zone, and HailoRT
(`hailo_platform`) needs a Hailo board and its driver. These fakes imitate the small part
of each API that edgetune uses, enforce the call order the real SDK needs, record every
call, and compute something checkable instead of compiling or running anything:

- `make_sdk_client()` → a fresh module to install as ``sys.modules["hailo_sdk_client"]``;
  `ClientRunner.compile()` returns fake HEF bytes (starting with `FAKE_HEF_MAGIC`).
  Set ``module.fail_in = "optimize"`` (any method name) to make that step raise.
- `make_hailort()` → a fresh module to install as ``sys.modules["hailo_platform"]``;
  its "device" returns, for each uint8 NHWC image, logits = per-channel mean / 64
  (see `fake_logits`), so the evaluator's HEF path can be checked end to end.

A passing test with these fakes shows that edgetune drives the API as documented; it
says nothing about whether the real compiler accepts a given model.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path
from typing import Any

import numpy as np

FAKE_HEF_MAGIC = b"FAKEHEF\x00"
FAKE_DEVICE_ID = "0000:01:00.0"
FAKE_ARCH = "HAILO8"

_log = logging.getLogger("hailo_sdk_client.fake")


class FakeSdkError(Exception):
    """What the fake raises where the real SDK would fail."""


# --------------------------------------------------------------------------- DFC


class FakeClientRunner:
    """Fake `hailo_sdk_client.ClientRunner`: records calls, checks order and arguments."""

    _ORDER = (
        "__init__",
        "translate_onnx_model",
        "load_model_script",
        "optimize_full_precision",
        "optimize",
        "compile",
    )

    def __init__(self, module: types.ModuleType, hw_arch: str = "hailo8", **kwargs: Any):
        self._module = module
        self.hw_arch = hw_arch
        self._done: list[str] = []
        self._record("__init__", hw_arch=hw_arch, **kwargs)

    def _record(self, method: str, **arguments: Any) -> None:
        """Check the step comes right after its predecessor, record it, maybe fail."""
        expected = self._ORDER[len(self._done)] if len(self._done) < len(self._ORDER) else None
        if method != expected:
            raise FakeSdkError(f"fake SDK: {method} called after {self._done}, expected {expected}")
        self._done.append(method)
        self._module.calls.append((method, arguments))
        _log.info("[fake DFC] %s", method)
        if self._module.fail_in == method:
            raise FakeSdkError(f"fake SDK failure injected in {method}")

    def translate_onnx_model(
        self,
        model: str,
        net_name: str,
        start_node_names: list[str] | None = None,
        end_node_names: list[str] | None = None,
        net_input_shapes: dict[str, list[int]] | None = None,
    ) -> tuple[str, str]:
        import onnx

        graph = onnx.load(model, load_external_data=False).graph
        inputs = {i.name for i in graph.input}
        ends = {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
        if not set(start_node_names or []) <= inputs:
            raise FakeSdkError(f"start nodes {start_node_names} not among inputs {inputs}")
        if not end_node_names or not set(end_node_names) <= ends:
            raise FakeSdkError(f"end nodes {end_node_names} not found in the ONNX graph")
        if set(net_input_shapes or {}) != set(start_node_names or []):
            raise FakeSdkError("net_input_shapes must be keyed by the start node names")
        self._record(
            "translate_onnx_model",
            model=model,
            net_name=net_name,
            start_node_names=start_node_names,
            end_node_names=end_node_names,
            net_input_shapes=net_input_shapes,
        )
        return f"{net_name}.hn", f"{net_name}.npz"

    def load_model_script(self, script: str) -> None:
        self._record("load_model_script", script=script)
        self.script = script

    def optimize_full_precision(self) -> None:
        self._record("optimize_full_precision")

    def optimize(self, calib_data: np.ndarray | dict[str, np.ndarray]) -> None:
        data = next(iter(calib_data.values())) if isinstance(calib_data, dict) else calib_data
        self._record("optimize", shape=tuple(data.shape), dtype=str(data.dtype))
        self.calibration = np.array(data, copy=True)

    def compile(self) -> bytes:
        self._record("compile")
        return FAKE_HEF_MAGIC + json.dumps({"hw_arch": self.hw_arch}).encode()


def make_sdk_client() -> types.ModuleType:
    """A fresh fake `hailo_sdk_client` module (own call record, no failure injected)."""
    module = types.ModuleType("hailo_sdk_client", "FAKE hailo_sdk_client for tests")
    module.__version__ = "0.0.0+fake"  # type: ignore[attr-defined]
    module.IS_FAKE = True  # type: ignore[attr-defined]
    module.calls = []  # type: ignore[attr-defined]
    module.runners = []  # type: ignore[attr-defined]
    module.fail_in = None  # type: ignore[attr-defined]

    def client_runner(*args: Any, **kwargs: Any) -> FakeClientRunner:
        runner = FakeClientRunner(module, *args, **kwargs)
        module.runners.append(runner)
        return runner

    module.ClientRunner = client_runner  # type: ignore[attr-defined]
    _log.setLevel(logging.INFO)  # the real SDK's loggers set their own level too
    return module


# --------------------------------------------------------------------------- HailoRT


def fake_logits(image: np.ndarray) -> np.ndarray:
    """The fake device's 'model': per-channel mean of a uint8 HWC image / 64."""
    return image.reshape(-1, image.shape[-1]).astype(np.float64).mean(axis=0) / 64.0


class _FakeStream:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.format_type: str | None = None
        self.buffer: np.ndarray | None = None

    def set_format_type(self, format_type: str) -> None:
        self.format_type = format_type

    def set_buffer(self, buffer: np.ndarray) -> None:
        self.buffer = buffer


class _FakeBindings:
    def __init__(self, model: FakeInferModel):
        self._in = _FakeStream(model.input().shape)
        self._out = _FakeStream(model.output().shape)

    def input(self) -> _FakeStream:
        return self._in

    def output(self) -> _FakeStream:
        return self._out


class _FakeConfigured:
    def __init__(self, model: FakeInferModel):
        self.model = model
        self.open = False

    def __enter__(self) -> _FakeConfigured:
        self.open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.open = False
        self.model.module.events.append("configured released")

    def create_bindings(self) -> _FakeBindings:
        return _FakeBindings(self.model)

    def run(self, bindings: list[_FakeBindings], timeout_ms: int) -> None:
        """Check what the real device would need, then 'infer'."""
        if not self.open:
            raise FakeSdkError("run() outside the configure() context")
        if len(bindings) > self.model.batch_size:
            raise FakeSdkError(f"{len(bindings)} bindings > batch size {self.model.batch_size}")
        for b in bindings:
            image, out = b.input().buffer, b.output().buffer
            if image is None or image.dtype != np.uint8 or image.shape != self.model.input().shape:
                raise FakeSdkError(f"input buffer must be uint8 {self.model.input().shape}")
            if out is None or out.dtype != np.float32:
                raise FakeSdkError("output buffer must be float32")
            out[...] = fake_logits(image).reshape(out.shape)
        self.model.module.events.append(f"run {len(bindings)}")


class FakeInferModel:
    def __init__(self, module: types.ModuleType, hef: str):
        self.module = module
        self.hef = hef
        self.batch_size = 1
        self._input = _FakeStream(module.input_shape)
        self._output = _FakeStream(module.output_shape)

    def set_batch_size(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def input(self) -> _FakeStream:
        return self._input

    def output(self) -> _FakeStream:
        return self._output

    def configure(self) -> _FakeConfigured:
        if self._input.format_type != "UINT8" or self._output.format_type != "FLOAT32":
            raise FakeSdkError("set input UINT8 and output FLOAT32 before configure()")
        return _FakeConfigured(self)


class _FakeVDevice:
    def __init__(self, module: types.ModuleType):
        self.module = module

    def __enter__(self) -> _FakeVDevice:
        self.module.events.append("vdevice acquired")
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.events.append("vdevice released")

    def create_infer_model(self, hef: str) -> FakeInferModel:
        if not Path(hef).read_bytes().startswith(FAKE_HEF_MAGIC):
            raise FakeSdkError(f"{hef} is not a (fake) HEF")
        return FakeInferModel(self.module, hef)

    def get_physical_devices_ids(self) -> list[str]:
        return [FAKE_DEVICE_ID]


class _FakeDevice:
    def __init__(self, device_id: str):
        self.control = types.SimpleNamespace(
            identify=lambda: types.SimpleNamespace(device_architecture=FAKE_ARCH)
        )

    @staticmethod
    def scan() -> list[str]:
        return [FAKE_DEVICE_ID]

    def release(self) -> None:
        pass


def make_hailort(
    input_shape: tuple[int, int, int] = (16, 16, 3), num_classes: int = 3
) -> types.ModuleType:
    """A fresh fake `hailo_platform` whose device serves one HEF of this NHWC input shape."""
    if num_classes != input_shape[-1]:
        raise ValueError("the fake model's logits are channel means: num_classes = channels")
    module = types.ModuleType("hailo_platform", "FAKE hailo_platform (HailoRT) for tests")
    module.__version__ = "4.99.0+fake"  # type: ignore[attr-defined]
    module.IS_FAKE = True  # type: ignore[attr-defined]
    module.events = []  # type: ignore[attr-defined]
    module.input_shape = input_shape  # type: ignore[attr-defined]
    module.output_shape = (num_classes,)  # type: ignore[attr-defined]
    module.FormatType = types.SimpleNamespace(UINT8="UINT8", FLOAT32="FLOAT32")  # type: ignore[attr-defined]
    module.VDevice = lambda *a, **k: _FakeVDevice(module)  # type: ignore[attr-defined]
    module.Device = _FakeDevice  # type: ignore[attr-defined]
    return module
