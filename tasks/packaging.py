"""A registered version as a real MLflow model: the ONNX flavour, ready to load and serve.

Every version edgetune registers (a classifier's best trial, a detector's champion) points
at an MLflow model folder in its run, ``mlflow_model/``:

- ``model.onnx``: a serving graph that takes what a camera gives, ``uint8`` images
  ``(N, H, W, 3)`` RGB at the trained size, and applies the training normalisation inside
  the graph. A classifier's graph ends in a softmax (output ``probabilities``, ``(N,
  classes)``); a detector's returns Ultralytics' raw output (boxes and class scores per
  anchor, before NMS). The graph wraps the compiled INT8 model when the compiler made an
  ONNX Runtime artifact (so the served model is the one measured on the board), and the
  float ONNX model otherwise (a Hailo ``.hef`` runs only on the board).
- ``compiled/<artifact>``: the compiled artifact as the board runs it (``.hef`` or INT8).
- ``MLmodel``: the signature, an input example (a real image: a calibration image for a
  classifier, one of the evaluated split for a detector), and
  ``metadata.edgetune``: class names, image size, normalisation, what the graph runs, the
  compiler, device and objective.

So ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(images)`` returns
``{"probabilities": …}`` and ``mlflow models serve`` needs no edgetune code.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.tracking import Tracker

MODEL_DIR = "mlflow_model"
SERVING_INPUT = "images"
PROBABILITIES = "probabilities"
_PREFIX = "edgetune_serving_"


class PackagingError(RuntimeError):
    """A run's model cannot be packaged; the message names the missing piece."""


def _normalisation(
    mean: np.ndarray, std: np.ndarray, normalised: str
) -> tuple[list[Any], list[Any]]:
    """The constants and nodes that turn ``uint8`` NHWC images into the normalised NCHW
    float tensor ``normalised``."""
    from onnx import TensorProto, helper, numpy_helper

    constants = [
        numpy_helper.from_array(
            np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1), f"{_PREFIX}mean"
        ),
        numpy_helper.from_array(
            np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1), f"{_PREFIX}std"
        ),
    ]
    pre = [
        helper.make_node(
            "Cast",
            [SERVING_INPUT],
            [f"{_PREFIX}float"],
            to=TensorProto.FLOAT,
            name=f"{_PREFIX}cast",
        ),
        helper.make_node(
            "Transpose",
            [f"{_PREFIX}float"],
            [f"{_PREFIX}nchw"],
            perm=[0, 3, 1, 2],
            name=f"{_PREFIX}nchw",
        ),
        helper.make_node(
            "Sub",
            [f"{_PREFIX}nchw", f"{_PREFIX}mean"],
            [f"{_PREFIX}centred"],
            name=f"{_PREFIX}sub",
        ),
        helper.make_node(
            "Div", [f"{_PREFIX}centred", f"{_PREFIX}std"], [normalised], name=f"{_PREFIX}div"
        ),
    ]
    return constants, pre


def serving_graph(model_path: Path, mean: np.ndarray, std: np.ndarray, *, softmax: bool) -> Any:
    """``model_path``'s ONNX graph fed from ``uint8`` NHWC images through ``(x - mean) / std``
    (per channel, 0..255 scale), with a softmax over its class axis when ``softmax``."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise PackagingError(
            f"{model_path.name} has {len(graph.input)} inputs and {len(graph.output)} "
            f"outputs; a served model needs one of each"
        )
    original = graph.input[0]
    dims = original.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise PackagingError(f"{model_path.name}'s input is not NCHW images")
    height, width = (d.dim_value or None for d in dims[2:])
    normalised = f"{_PREFIX}normalised"
    images = helper.make_tensor_value_info(
        SERVING_INPUT, TensorProto.UINT8, [dims[0].dim_value or "batch", height, width, 3]
    )
    constants, pre = _normalisation(mean, std, normalised)
    # The normalised tensor gets a name of its own (a detector's input is also "images").
    for node in graph.node:
        node.input[:] = [normalised if name == original.name else name for name in node.input]
    kept = [info for info in graph.value_info if info.name != original.name]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    nodes = [*pre, *graph.node]
    outputs = list(graph.output)
    if softmax:
        logits = outputs[0]
        nodes.append(
            helper.make_node(
                "Softmax", [logits.name], [PROBABILITIES], axis=1, name=f"{_PREFIX}softmax"
            )
        )
        shape = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
        outputs = [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, shape)]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(images)
    graph.initializer.extend(constants)
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(model)
    return model


def _run(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {SERVING_INPUT: images}), strict=True))


def _signature(example: np.ndarray, outputs: Mapping[str, np.ndarray], batch: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(array: np.ndarray, name: str) -> TensorSpec:
        return TensorSpec(array.dtype, (batch, *array.shape[1:]), name)

    return ModelSignature(
        inputs=Schema([spec(example, SERVING_INPUT)]),
        outputs=Schema([spec(value, name) for name, value in outputs.items()]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("onnx", "onnxruntime", "numpy")]


def served_arrays(bundle: Path) -> dict[str, np.ndarray]:
    """What a served model takes from a bundle (evaluation or calibration): images for the
    input example, the classes and the normalisation."""
    with np.load(bundle) as data:
        return {key: data[key] for key in ("images", "mean", "std", "classes")}


def save_served_model(
    onnx_model: Path,
    compiled: Path,
    bundle: Mapping[str, np.ndarray],
    out: Path,
    *,
    classifier: bool,
    metadata: Mapping[str, Any],
) -> Path:
    """Write the MLflow model folder (see the module docstring) to ``out``."""
    import mlflow.onnx

    runs_compiled = compiled.suffix == ".onnx"
    graph = serving_graph(
        compiled if runs_compiled else onnx_model,
        bundle["mean"],
        bundle["std"],
        softmax=classifier,
    )
    example = np.ascontiguousarray(bundle["images"][:1].astype(np.uint8))
    # a detector exported for the board takes one image per call (a fixed batch of 1)
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value or -1
    outputs = _run(graph, example)
    # float32 constants shown as written (123.675, not 123.675003)
    mean, std = ([float(f"{v:.7g}") for v in bundle[k]] for k in ("mean", "std"))
    described = {
        "kind": "classifier" if classifier else "detector",
        "class_names": [str(c) for c in bundle["classes"]],
        "image_size": list(example.shape[1:3]),
        "batch": "any" if batch == -1 else batch,
        "input": "uint8 RGB images (N, H, W, 3), 0..255, at image_size"
        + ("" if classifier else ", letterboxed (grey 114 padding) like Ultralytics"),
        "normalisation": {"mean": mean, "std": std, "applied_in_graph": True},
        "output": (
            f"{PROBABILITIES}: (N, classes) softmax, in class_names order"
            if classifier
            else f"{next(iter(outputs))}: Ultralytics raw output (N, 4 + classes, anchors): "
            "box centre x, y, width, height in input pixels, then class scores; apply NMS"
        ),
        "graph": "compiled INT8 model (as on the board)"
        if runs_compiled
        else "float ONNX model (the compiled artifact runs only on the board)",
        "compiled_artifact": f"compiled/{compiled.name}",
        **metadata,
    }
    providers = ["CPUExecutionProvider"] if runs_compiled else None
    mlflow.onnx.save_model(
        graph,
        str(out),
        signature=_signature(example, outputs, batch),
        input_example=example,
        pip_requirements=_requirements(),
        onnx_execution_providers=providers,
        metadata={"edgetune": described},
        save_as_external_data=False,
    )
    (out / "compiled").mkdir()
    shutil.copyfile(compiled, out / "compiled" / compiled.name)
    return out


def packaged(tracker: Tracker, run_id: str) -> bool:
    return any(
        item.path == f"{MODEL_DIR}/MLmodel"
        for item in tracker.client.list_artifacts(run_id, MODEL_DIR)
    )


def package_run(
    tracker: Tracker,
    run_id: str,
    *,
    onnx_artifact: str,
    compiled_artifact: str,
    bundle: tuple[str, str],
    classifier: bool,
    metadata: Mapping[str, Any],
) -> str:
    """Log run ``run_id``'s model as an MLflow model at ``mlflow_model/`` (once; a run
    registered again keeps its folder) and return that artifact path. ``bundle`` is the
    (run id, artifact path) of the evaluated split's bundle: its images, classes and
    normalisation."""
    if packaged(tracker, run_id):
        return MODEL_DIR
    with tempfile.TemporaryDirectory(prefix="edgetune-package-") as tmp:
        work = Path(tmp)
        onnx_model = tracker.download(run_id, onnx_artifact, work / "in")
        compiled = tracker.download(run_id, compiled_artifact, work / "in")
        out = save_served_model(
            onnx_model,
            compiled,
            served_arrays(tracker.download(bundle[0], bundle[1], work / "bundle")),
            work / "model",
            classifier=classifier,
            metadata=metadata,
        )
        tracker.client.log_artifacts(run_id, str(out), MODEL_DIR)
    return MODEL_DIR
