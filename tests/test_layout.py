"""The code's map holds: imports point one way, engine jobs live in their packages, the public names resolve."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "utils")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules a file imports (at any depth: lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:  # `from pkg import mod` names a module; `from mod import f` does not
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {_module_name(p) for p in files}
    graph = {}
    for p in files:
        name = _module_name(p)
        graph[name] = {m for m in _imports(p, known) if m != name and not name.startswith(m + ".")}
        graph[name].discard("utils")  # the package root holds nothing
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_known_edges():
    graph = import_graph()  # the checker itself must see real edges, or every rule below passes vacuously
    assert "utils.engine.validator" in graph["utils.engine.train.trainer"]
    assert "utils.engine.track.sequence" in graph["utils.engine.predict.predictor"]
    assert "models.common" in graph["models.yolo"]


def test_no_import_cycle():
    graph = import_graph()
    # a package __init__ that re-exports lazily may name its children; skip package roots for the cycle check
    graph = {k: {m for m in v if m not in ("utils.engine",)} for k, v in graph.items() if k != "utils.engine"}
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


# (importer prefix, forbidden prefix): low layers never import high ones
RULES = [
    ("models", "utils.engine"), ("models", "utils.data"), ("models", "utils.plots"),
    ("utils.data", "models"), ("utils.data", "utils.engine"),
    ("utils.loss", "utils.engine"), ("utils.metrics", "utils.engine"), ("utils.plots", "utils.engine"),
    ("utils.deploy", "utils.engine"),  # the engine runs exported files through utils.deploy.formats, not back
    ("utils.engine.track", "utils.engine.predict"), ("utils.engine.track", "utils.engine.train"),
    ("utils.engine.predict", "utils.engine.train"), ("utils.engine.train", "utils.engine.predict"),
    ("utils.engine.train", "utils.engine.track"),
]
SHARED = ["utils.engine.config", "utils.engine.backend", "utils.engine.validator", "utils.engine.sources",
          "utils.engine.graphs", "utils.engine.tta", "utils.engine.distributed"]


@pytest.mark.parametrize("importer,forbidden", RULES + [(s, j) for s in SHARED for j in
                                                        ("utils.engine.train", "utils.engine.predict",
                                                         "utils.engine.track")])
def test_imports_point_down(importer, forbidden):
    bad = sorted(f"{mod} imports {dep}" for mod, deps in import_graph().items()
                 if mod == importer or mod.startswith(importer + ".")
                 for dep in deps if dep == forbidden or dep.startswith(forbidden + "."))
    assert not bad, "; ".join(bad)


def test_engine_groups_jobs_in_packages():
    engine = ROOT / "utils" / "engine"
    top = sorted(p.stem for p in engine.glob("*.py") if p.stem != "__init__")
    assert top == sorted(s.rpartition(".")[2] for s in SHARED)
    for job in ("train", "predict", "track"):
        assert (engine / job / "__init__.py").is_file()


def test_public_names_resolve():
    import utils.engine as engine
    from utils.engine.predict.predictor import Predictor
    from utils.engine.track.bytetrack import ByteTracker
    from utils.engine.train.trainer import Trainer
    from utils.engine.validator import Validator

    assert engine.Predictor is Predictor and engine.Trainer is Trainer
    assert engine.Validator is Validator and engine.ByteTracker is ByteTracker
    with pytest.raises(AttributeError):
        engine.NoSuchThing  # noqa: B018


def test_test_time_limits_scale_with_the_machine_load():
    """Every subprocess/thread time limit in the tests (timeout= of subprocess.run, .wait, .communicate, .join)
    and every elapsed-time bound (time.time() - t0 < ...) goes through helpers.limit, so a loaded machine does
    not fail a correct run. (The tests' own runner functions take idle-machine seconds and scale them.)"""
    bare = []
    for f in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            consts = []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                consts = [k.value for k in node.keywords if k.arg == "timeout"]
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.BinOp) \
                    and "time" in ast.unparse(node.left):
                consts = [c for op, c in zip(node.ops, node.comparators) if isinstance(op, (ast.Lt, ast.LtE))]
            bare += [f"{f.name}:{node.lineno}: {ast.unparse(node)[:90]}" for c in consts
                     if isinstance(c, ast.Constant) and isinstance(c.value, (int, float))]
    assert not bare, "use helpers.limit(seconds):\n" + "\n".join(bare)
