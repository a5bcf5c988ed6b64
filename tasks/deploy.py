"""Create or update, idempotently, what a distributed study needs on the Prefect server.

- the work pools ``controller``, ``gpu``, ``compile`` and ``edge`` (process pools); the edge
  pool's concurrency limit is the number of boards;
- one global concurrency limit per board (limit 1; the device stage takes it with
  ``strict=True`` and a lease, so a crashed holder frees it and a typo cannot bypass it);
- the deployments of ``deployments/prefect.yaml`` with module entrypoints. Each flow is
  imported first, so an import error shows here and not later on a worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tasks.config import DeviceConfig, device_limit_name

POOLS = ("controller", "gpu", "compile", "edge")
EDGE_POOL = "edge"
DEFAULT_FILE = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"


class DeployError(ValueError):
    """The deployments file or a flow cannot be deployed; the message names the fix."""


@dataclass
class DeployReport:
    pools: dict[str, int | None] = field(default_factory=dict)
    device_limits: list[str] = field(default_factory=list)
    deployments: list[str] = field(default_factory=list)


def read_deployments(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DeployError(
            f"deployments file {path} not found; pass --file deployments/prefect.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise DeployError(f"{path}: malformed YAML: {problem}; fix the syntax") from None
    specs = data.get("deployments") if isinstance(data, dict) else None
    if not isinstance(specs, list) or not specs:
        raise DeployError(f"{path}: expected a non-empty 'deployments' list")
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise DeployError(f"{path}: deployments[{index}] is {spec!r}, not a mapping")
        missing = [k for k in ("name", "entrypoint") if not spec.get(k)]
        if missing or not (spec.get("work_pool") or {}).get("name"):
            raise DeployError(
                f"{path}: deployments[{index}] needs name, entrypoint and work_pool.name "
                f"(missing: {', '.join(missing) or 'work_pool.name'})"
            )
        if ".py:" in spec["entrypoint"]:
            raise DeployError(
                f"{path}: deployments[{index}].entrypoint {spec['entrypoint']!r} is a file path; "
                f"use a module path such as flows.tune:tune"
            )
    return list(specs)


def ensure_pool(client: Any, name: str, concurrency_limit: int | None) -> None:
    # Prefect's client and worker APIs load only when deploying.
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                concurrency_limit=concurrency_limit,
            )
        )
        return
    if pool.concurrency_limit != concurrency_limit:
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))


def apply_deployment(spec: dict[str, Any]) -> str:
    # Prefect's client and worker APIs load only when deploying.
    from prefect.deployments.runner import EntrypointType
    from prefect.flows import load_flow_from_entrypoint

    try:
        flow: Any = load_flow_from_entrypoint(spec["entrypoint"])
    except Exception as exc:
        raise DeployError(
            f"cannot import {spec['entrypoint']!r} for deployment {spec['name']!r}: {exc}; "
            f"install edgetune in this environment"
        ) from None
    deployment = flow.to_deployment(
        name=spec["name"],
        description=spec.get("description"),
        tags=spec.get("tags"),
        parameters=spec.get("parameters") or {},
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment.apply(work_pool_name=spec["work_pool"]["name"])
    return f"{flow.name}/{spec['name']}"


def deploy(
    path: Path = DEFAULT_FILE,
    *,
    devices: Iterable[str] = ("local-cpu",),
) -> DeployReport:
    """Apply pools, per-device limits and deployments; safe to run again."""
    # Prefect's client and worker APIs load only when deploying.
    from prefect.client.orchestration import get_client

    boards = sorted(set(devices))
    if not boards:
        raise DeployError("no device given; name at least one board with --device NAME")
    for board in boards:
        try:
            DeviceConfig(name=board)
        except ValidationError:
            raise DeployError(
                f"device {board!r} is not a board name: use letters, digits, '_', '.' and "
                f"'-', starting with a letter or digit (as device.name in a config)"
            ) from None
    specs = read_deployments(path)
    report = DeployReport()
    with get_client(sync_client=True) as client:
        for pool in POOLS:
            limit = len(boards) if pool == EDGE_POOL else None
            ensure_pool(client, pool, limit)
            report.pools[pool] = limit
        for board in boards:
            name = device_limit_name(board)
            client.upsert_global_concurrency_limit_by_name(name, 1)
            report.device_limits.append(name)
    for spec in specs:
        report.deployments.append(apply_deployment(spec))
    return report
