"""The package's shape, checked: no import cycles, dependencies point down the layers, nothing
live imports the analysis code, and files and functions stay small enough to read."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PILOT = REPO / "pilot"

# folder -> the pilot folders it may import (nanochat and third parties are always allowed)
LAYERS = {
    "config": set(),
    "infra": {"config"},
    "events": {"config", "infra"},
    "energy": {"config", "infra", "events"},
    "k8s": {"config", "infra"},
    "provisioner": {"config", "infra", "k8s"},
    "control": {"config", "infra", "events", "energy", "provisioner"},
    "flower": {"config", "infra", "events", "energy", "control", "provisioner"},
    "analysis": {"config", "infra", "events", "energy", "control"},
    "launch": {"config", "infra", "events", "energy", "control", "analysis"},
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PILOT.rglob("*.py")
    }


def _imports(path: Path) -> set[str]:
    """pilot modules ``path`` imports, at any depth (a function-level import is a dependency)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pilot"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pilot")}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_every_pilot_module_lives_in_a_layer_folder():
    loose = [m for m in _modules() if m != "pilot" and _folder(m) is None and m[6:] not in LAYERS]
    assert not loose, f"modules outside the layer folders: {loose}"
    assert {_folder(m) for m in _modules() if _folder(m)} <= set(LAYERS)


def test_the_import_graph_has_no_cycle():
    graph = _graph()  # a package's own submodules included: they import what it defines
    edges = graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_dependencies_point_down_the_layers_and_nothing_live_imports_analysis():
    bad = []
    for m, deps in _graph().items():
        here = _folder(m)
        if here is None:
            continue
        for d in deps:
            there = _folder(d)
            if there and there != here and there not in LAYERS[here]:
                bad.append(f"{m} -> {d}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def _function_lengths(path: Path) -> dict[str, int]:
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = max(out.get(node.name, 0), node.end_lineno - node.lineno + 1)
    return out


def test_no_file_over_400_lines_and_no_function_over_60():
    problems = []
    for p in sorted(PILOT.rglob("*.py")):
        rel = p.relative_to(PILOT).as_posix()
        lines = len(p.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            problems.append(f"{rel}: {lines} lines (limit {MAX_FILE_LINES})")
        for name, n in _function_lengths(p).items():
            if n > MAX_FUNCTION_LINES:
                problems.append(f"{rel}:{name}: {n} lines (limit {MAX_FUNCTION_LINES})")
    assert not problems, "\n".join(problems)
