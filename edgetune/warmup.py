"""Imports a command will need, made in a background thread while it waits.

``edgetune tune`` spends its first seconds importing its engine (Optuna, Prefect, MLflow)
and then waiting: for the project's Prefect server to answer, for the flow run to be
created, for the board's process in the dry run. Python runs one thread at a time, so a
second thread importing torch and the rest speeds nothing up while the command computes,
but it fills those waits, and what it imported is ready when the dry run, the first
training and the study's plots need it. It imports only what the command imports anyway,
in the order the command needs it; an import that fails here is left for the command to
meet (and report) where it is used.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence

#: What a study started by ``edgetune tune`` imports after its first waits, in order: the
#: dry run and the trial's stages (torch, torchvision, ONNX, the compiler), MLflow's store
#: and client, then the plotting libraries of the study's end (``tasks.hpo.reports``) and
#: a throwaway figure (``module:function``: a step that warms more than the imports).
TUNE_MODULES = (
    "tasks.models",
    "tasks.training.rng",
    "tasks.training.loaders",
    "tasks.training.fmfp",
    "tasks.export",
    "onnxruntime",
    "onnxruntime.quantization",
    "mlflow.tracking.client",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.artifacts",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "plotly.graph_objects",
    "plotly.subplots",
    "plotly.io",
    "tasks.hpo.interactive:warm",
)

_started: list[threading.Thread] = []


def _import_all(modules: Sequence[str]) -> None:
    for name in modules:
        module, _, call = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if call:  # a warm-up step of the module's own (``interactive.warm``)
                getattr(loaded, call)()
        except Exception:  # the command imports it again where it is used, and says why
            continue


def start(modules: Sequence[str] = TUNE_MODULES) -> threading.Thread:
    """Import ``modules`` (or run ``module:function``) in a daemon thread: a command that
    ends early does not wait for it."""
    thread = threading.Thread(
        target=_import_all, args=(tuple(modules),), name="edgetune-warmup", daemon=True
    )
    thread.start()
    _started.append(thread)
    return thread


def wait(timeout: float | None = None) -> None:
    """Wait for the imports started here (tests: nothing left importing behind them)."""
    for thread in _started:
        thread.join(timeout)
