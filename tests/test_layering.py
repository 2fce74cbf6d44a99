"""The package's import graph, read from the source (ast): no cycles, `core` imports no stage,
and every import points down the layers.

Layers, lowest first; a module imports its own layer and those below it, never above:

    foundation  the package root (`__version__` and a lazy by-name facade), errors, config
                (the one strict-config base), fileio (bounded reading, validation, atomic
                writes), timing
    models      families, loading, the label conditioner, the digits classifier
    sampling    the noise schedule and the sampling loop
    data        teacher calibration, digits, adaptation tasks
    probes      activation capture and the probes that training and several stages share
    export      ONNX graphs, their cards, deployment precisions
    adapters    TD-LoRA, DiffScaler, their store, export and serving
    train       distillation, fine-tuning, zoo teachers, the learning-rate schedule
    contract    core: the stage contract and registry, the manifest (save, restore), recipes,
                phase records, process roles
    evaluate    measures models and exported graphs, judges deployments, writes reports
    codec       the learned image codec, an application of export and evaluate
    pipeline    core.pipeline: calibration -> stages (through the registry) -> training ->
                export -> evaluation
    stages      the compression methods, built on the contract, training and probes
    cli         the command line and its options

An import is any `import` statement anywhere in a module, in a function too: a lazy import
delays loading but is still a dependency of the design. Imports under `if TYPE_CHECKING:` are
annotations, not imports. `from package import name` depends on the submodule `name` when there
is one, else on the package. The root's facade resolves its names with `importlib` when they are
first used, after every module is importable, so it is not an import here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "dit_compress"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS = [
    ("foundation", [PACKAGE, f"{PACKAGE}.errors", f"{PACKAGE}.config", f"{PACKAGE}.fileio",
                    f"{PACKAGE}.timing"]),
    ("models", [f"{PACKAGE}.models"]),
    ("sampling", [f"{PACKAGE}.sampling"]),
    ("data", [f"{PACKAGE}.data"]),
    ("probes", [f"{PACKAGE}.probes"]),
    ("export", [f"{PACKAGE}.export"]),
    ("adapters", [f"{PACKAGE}.adapters"]),
    ("train", [f"{PACKAGE}.train"]),
    ("contract", [f"{PACKAGE}.core"]),
    ("evaluate", [f"{PACKAGE}.evaluate"]),
    ("codec", [f"{PACKAGE}.codec"]),
    ("pipeline", [f"{PACKAGE}.core.pipeline"]),
    ("stages", [f"{PACKAGE}.stages"]),
    ("cli", [f"{PACKAGE}.cli", f"{PACKAGE}.cli_options"]),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package)} for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)


def _import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported module: first line}} within the package."""
    modules = _modules()

    def known(name: str) -> str:
        while name not in modules:  # `import a.b.func`-like names end in their deepest module
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in modules.items():
        edges: dict[str, int] = {}
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                           for a in node.names]
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    target = known(target)
                    if target != name:
                        edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _where(module: str, line: int) -> str:
    path = module.replace(".", "/")
    return f"{path}/__init__.py:{line}" if (ROOT.parent / path).is_dir() else f"{path}.py:{line}"


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            matches = module == p if p == PACKAGE else (module == p or module.startswith(p + "."))
            if matches and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: place it in LAYERS (and docs/ARCHITECTURE.md)")
    return best


def _core_to_stages(a: str, b: str) -> bool:
    return a.startswith(f"{PACKAGE}.core") and (b == f"{PACKAGE}.stages" or b.startswith(f"{PACKAGE}.stages."))


@pytest.fixture(scope="module")
def graph():
    return _import_graph()


@pytest.fixture(scope="module")
def rest(graph):
    """The graph less the imports `test_core_imports_no_stage` forbids, so each cause fails one test."""
    return {a: {b: line for b, line in edges.items() if not _core_to_stages(a, b)} for a, edges in graph.items()}


def test_the_graph_is_read(graph):
    # A parse that silently found nothing would pass everything below.
    assert len(graph) > 50
    assert graph[f"{PACKAGE}.core.manifest"].get(f"{PACKAGE}.models.load")
    assert f"{PACKAGE}.data.calibration" in graph[f"{PACKAGE}.stages.prune.width"]
    # relative, function-level and `from package import submodule` imports all count
    assert f"{PACKAGE}.core.manifest" in graph[f"{PACKAGE}.evaluate.memory"]
    assert f"{PACKAGE}.adapters" in graph[f"{PACKAGE}.train.finetune"]


def test_core_imports_no_stage(graph):
    bad = [f"{_where(a, line)}: {a} imports {b}" for a, edges in sorted(graph.items())
           for b, line in sorted(edges.items()) if _core_to_stages(a, b)]
    assert not bad, "core reaches stages only through the registry:\n" + "\n".join(bad)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        inside, start = set(component), min(component)
        paths = {start: [start]}
        queue = [start]
        while queue:  # breadth first: the shortest way back to `start` inside the component
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    cycles.append(paths[v] + [start])
                    queue = []
                    break
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return cycles


def test_no_import_cycles(rest):
    cycles = _cycles(rest)
    lines = [" -> ".join(c) + "\n    " + ", ".join(_where(a, rest[a][b]) for a, b in zip(c, c[1:]))
             for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_cycle_finder_finds_a_cycle():
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert _cycles(g) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_imports_point_down_the_layers(rest):
    names = [n for n, _ in LAYERS]
    bad = [f"{_where(a, line)}: {a} ({names[_layer(a)]}) imports {b} ({names[_layer(b)]})"
           for a, edges in sorted(rest.items()) for b, line in sorted(edges.items()) if _layer(b) > _layer(a)]
    assert not bad, "imports against the layer order (see this file's docstring):\n" + "\n".join(bad)


def test_light_package_import():
    """`import dit_compress` and the CLI module load no torch-pruning, ONNX or accelerate."""
    import subprocess
    import sys

    code = ("import sys, dit_compress, dit_compress.cli; "
            "print(' '.join(m for m in ('torch_pruning', 'onnx', 'onnxruntime', 'accelerate', 'peft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout.strip()
    assert out == "", f"imported at package import: {out}"
