"""Layers that point one way (docs/design.md, "Layers"): every import inside fusion/ goes from
a higher layer to a lower one, and no chain of imports, lazy ones included, comes back to
where it started. A new back-edge fails here, naming the file and line."""

import ast
from pathlib import Path

import pytest

FUSION = Path(__file__).resolve().parents[1] / "fusion"

# Lowest first. A package may import its own modules and any package of a lower rank.
LAYERS = (
    ("errors", "io"),
    ("distributed",),  # which process this is; work split over ranks (docs/scaling.md)
    ("config",),
    ("data",),
    ("image", "models"),
    ("sampling",),
    ("families",),
    ("convert",),  # other projects' checkpoints into fusion's formats (docs/pretrained.md)
    ("eval",),
    ("training",),
    ("api",),  # FusionPipeline: how a model folder is loaded and sampled, for the jobs too
    ("jobs", "pipeline", "benchmarks"),
    ("study",),  # runs of stage 2 + scoring through the main job's stage runner
    ("__init__",),  # fusion.FusionPipeline, imported on first use
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(root: Path) -> list[tuple[str, str, str]]:
    """(importing module, imported fusion module, "file:line") for every import statement,
    at module level or inside a function (a lazy import is still a dependency)."""
    top = root.name
    out = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name == top or name.startswith(top + "."):
                    out.append((source, name, f"{path.relative_to(root.parent)}:{node.lineno}"))
    return out


def layer_violations(root: Path) -> list[str]:
    bad = []
    for source, target, where in imports(root):
        a, b = package_of(source), package_of(target)
        if a == b:
            continue
        if a not in RANK or b not in RANK:
            bad.append(f"{where}: package {a if a not in RANK else b!r} has no layer; add it to "
                       "LAYERS (tests/test_layers.py) and docs/design.md")
        elif RANK[b] >= RANK[a]:
            bad.append(f"{where}: {source} imports {target}, but {b} is not below {a}")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles in the module graph (imported packages resolved to their __init__)."""
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for source, target, _ in imports(root):
        while target not in modules and "." in target:  # `from fusion.x import name`
            target = target.rsplit(".", 1)[0]
        if target in modules and target != source:
            graph[source].add(target)
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_imports_go_down_the_layers():
    assert layer_violations(FUSION) == []


def test_no_import_cycles():
    assert import_cycles(FUSION) == []


@pytest.fixture
def toy_package(tmp_path):
    root = tmp_path / "fusion"
    for pkg in ("data", "sampling", "training"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "data" / "a.py").write_text("X = 1\n")
    (root / "sampling" / "b.py").write_text("from fusion.data.a import X\n")
    (root / "training" / "c.py").write_text("import fusion.sampling.b\n")
    return root


def test_the_checks_fail_on_a_back_edge_and_a_cycle(toy_package):
    assert layer_violations(toy_package) == [] and import_cycles(toy_package) == []
    # a lazy import inside a function counts as much as one at the top
    (toy_package / "sampling" / "b.py").write_text(
        "from fusion.data.a import X\n\ndef f():\n    from fusion.training.c import g\n")
    assert layer_violations(toy_package) == [
        "fusion/sampling/b.py:4: fusion.sampling.b imports fusion.training.c, but training is "
        "not below sampling"]
    assert import_cycles(toy_package) == [
        ["fusion.sampling.b", "fusion.training.c", "fusion.sampling.b"]]
