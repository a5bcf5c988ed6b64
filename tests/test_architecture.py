"""The package's structure, read from its own source: imports flow one way, with no cycle,
and every module imports on its own.

The import graph is built with ``ast`` from every import statement in ``tasks/`` and
``flows/``: module level, inside functions and under ``TYPE_CHECKING`` alike (a cycle
hidden in a function is still a cycle for the reader).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows")
#: Longest function without a comment that says why it is longer.
MAX_LINES = 80

#: The layers, top to bottom: a module may import its own layer and the layers below.
LAYERS = (
    ("flows",),
    ("tasks.hpo",),
    ("tasks.workloads",),
    (
        "tasks.preflight",
        "tasks.detection",
        "tasks.board",
        "tasks.deploy",
    ),
    (
        "tasks.config",
        "tasks.space",
        "tasks.data",
        "tasks.models",
        "tasks.training",
        "tasks.export",
        "tasks.compilers",
        "tasks.devices",
        "tasks.metrics",
        "tasks.tracking",
        "tasks.packaging",
        "tasks.storage",
        "tasks.secrets",
        "tasks.host",
        "tasks.inputs",
        "tasks.digest",
        "tasks.seeding",
        "tasks.runlog",
        "tasks.failures",
        "tasks",
    ),
)


def module_files() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported dotted name belongs to (None: not ours)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the project modules it imports (a submodule named in ``from pkg import
    sub`` counts as an import of the submodule, not of the package)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for target in filter(None, (_target(t, modules) for t in targets)):
                if target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> int:
    best, depth = -1, 0
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = level, len(prefix)
    assert best >= 0, f"{module} is in no layer; add it to LAYERS in {Path(__file__).name}"
    return best


def test_the_graph_reader_finds_a_cycle_and_submodule_imports(tmp_path: Path) -> None:
    (tmp_path / "tasks" / "pkg").mkdir(parents=True)
    (tmp_path / "tasks" / "pkg" / "__init__.py").write_text("from tasks.pkg import a\n")
    (tmp_path / "tasks" / "pkg" / "a.py").write_text("def f():\n    from tasks import b\n")
    (tmp_path / "tasks" / "b.py").write_text("from .pkg.a import f\n")
    modules = {
        "tasks.pkg": tmp_path / "tasks" / "pkg" / "__init__.py",
        "tasks.pkg.a": tmp_path / "tasks" / "pkg" / "a.py",
        "tasks.b": tmp_path / "tasks" / "b.py",
    }
    graph = import_graph(modules)
    assert graph == {
        "tasks.pkg": {"tasks.pkg.a"},
        "tasks.pkg.a": {"tasks.b"},
        "tasks.b": {"tasks.pkg.a"},
    }
    assert cycles(graph) == [["tasks.b", "tasks.pkg.a"]]


def test_tasks_and_flows_import_each_other_in_no_cycle() -> None:
    assert cycles(import_graph(module_files())) == []


def test_imports_point_down_the_layers() -> None:
    """flows → engine (tasks.hpo) → workloads → stage helpers → leaves; never upwards."""
    upward = [
        f"{source} imports {target}"
        for source, targets in import_graph(module_files()).items()
        for target in sorted(targets)
        if layer(target) < layer(source)
    ]
    assert upward == []


def test_every_module_imports_alone() -> None:
    """Each module of tasks/ and flows/ imports with none of the project loaded before it
    (a partly initialised module in a cycle fails here); one interpreter, project modules
    dropped between imports (third-party ones stay, for speed)."""
    names = sorted(module_files())
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('tasks', 'flows')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    halves = [names[::2], names[1::2]]  # two interpreters at once: two cores
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *half],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for half in halves
    ]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        assert out.strip() == ""


def test_no_function_is_long_without_saying_why() -> None:
    """Over 80 lines, a function starts with a comment that says why (``# Over 80 lines``)."""
    long = []
    for path in module_files().values():
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            body = lines[node.lineno - 1 : node.end_lineno]
            if length > MAX_LINES and not any("# Over 80 lines" in line for line in body):
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length})")
    assert long == []


#: Project modules that import torch at their top: imported inside the functions that train
#: or export, so the compile and device stages, the CLI and the engine start without torch.
TORCH_MODULES = ("tasks.models", "tasks.training", "tasks.export")


def test_project_modules_are_imported_at_the_top_but_torch_bound_ones() -> None:
    """A function-local import of a project module hides an arrow from the reader (and
    once hid a cycle); only the torch-bound modules may be imported late."""
    late = []
    for name, path in module_files().items():
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                if module is None or module.split(".")[0] not in PACKAGES:
                    continue
                if not any(module == t or module.startswith(t + ".") for t in TORCH_MODULES):
                    late.append(f"{name}:{node.lineno} imports {module} in {function.name}")
    assert late == []


def test_the_engine_and_the_config_start_without_torch() -> None:
    script = (
        "import sys\n"
        "import flows.tune, tasks.hpo.campaign, tasks.config, tasks.workloads.registry\n"
        "print('torch' in sys.modules, 'ultralytics' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
