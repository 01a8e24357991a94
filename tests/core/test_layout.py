"""The package layout (docs/architecture.md): one subpackage per stage, imports flowing one way, no circles.

The import graph is read from the source (every ``import`` statement, inside functions too, and
the package ``__init__`` that an import from another package runs), so a circle that only closes
at run time, like a command module importing a helper of the module that imports it, is found
before any user hits it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import cleandift_rt

PACKAGE = Path(cleandift_rt.__file__).resolve().parent
ROOT = "cleandift_rt"

# Each stage may import only lower layers (and its own subpackage). Every command lives in the
# ``cli`` package, the application layer at the top; nothing in the library imports it.
LAYERS = {
    "_native": -1,  # the compiled extension (csrc/)
    "taps": 0, "timesteps": 0, "checks": 0, "conditioning": 0, "build_info": 0, "checkpoint": 0, "assets": 0,
    "viz": 0,
    "models": 1,
    "runs": 1,  # the resumable run loop, training checkpoints, the skip log: below every trainer and loader
    "features": 2,
    "kernels": 3, "formats": 3,
    "runtime": 4,
    "export": 5, "evaluation": 5, "training": 5,
    "gate": 5,
    "probes": 5,
    "extraction": 5,  # the local pipelined extractor, manifest, per-image files and shards (an Engine passed in)
    "explore": 5,  # the correspondence explorer: session, recipes, web page (Engine, heads, Fusion, Tracker passed in)
    "tracking": 5,  # the point tracker, TAP-Vid metrics, synthetic videos (an Engine passed in; runtime.latest)
    "serving": 5,  # Triton model repositories, the PyTriton server and its client (an Engine passed in)
    # systems built on the stages: Diffusion Hyperfeatures (above runtime and export: trained on an Engine's
    # taps, its aggregator a derived output they run), Ray Data extraction (above extraction, whose manifest
    # and shards it shares), fusion recipes (above evaluation, whose runner and PCK they reuse)
    "hyper": 6, "distributed": 6, "fusion": 6,
    "cli": 7,
}
PUBLIC_FACE = max(LAYERS.values()) + 1  # the package's own __init__
MAX_LINES = 500


def module_name(path: Path, top: Path, root: str) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([root, *parts])


def import_graph(top: Path, root: str, compiled=("_native",)) -> dict[str, set[str]]:
    """{module: modules it imports} within the package rooted at ``top`` (named ``root``); ``compiled``
    names its extension modules, which have no source here."""
    files = {module_name(p, top, root): p for p in sorted(top.rglob("*.py"))}
    modules = set(files) | {f"{root}.{name}" for name in compiled}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for alias in node.names:  # a submodule, or a name defined in the package's __init__
                    targets.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin)
        edges = set()
        for target in targets:
            if not (target == root or target.startswith(root + ".")):
                continue
            target = target if target in modules else target.rsplit(".", 1)[0]  # `import pkg.mod.name`
            edges.add(target)
            # importing pkg.sub.mod from outside pkg.sub runs pkg.sub's __init__ first
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if not name.startswith(parent + ".") and name != parent:
                    edges.add(parent)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str) -> tuple[str, int]:
    """(group, layer) of a module: the group is its subpackage (or top-level module)."""
    parts = module.split(".")[1:]
    if not parts:
        return "public", PUBLIC_FACE
    if parts[0] not in LAYERS:
        raise AssertionError(f"{module}: subpackage {parts[0]!r} has no layer; add it to LAYERS (and to "
                             "docs/architecture.md)")
    return parts[0], LAYERS[parts[0]]


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE, ROOT)


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_function_level_and_package_circles(tmp_path):
    """The checker itself: it must see a circle closed by an import inside a function (today's two
    circles were such imports) and one closed through a package __init__."""
    pkg = tmp_path / "demo_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\n\ndef g():\n    return a\n")
    assert find_cycle(import_graph(pkg, "demo_pkg")) is not None
    (pkg / "b.py").write_text("from .sub.c import h\n\ndef g():\n    return h\n")
    (pkg / "sub" / "__init__.py").write_text("from ..a import f\n")
    (pkg / "sub" / "c.py").write_text("def h():\n    return 1\n")
    (pkg / "a.py").write_text("X = 1\n")
    assert find_cycle(import_graph(pkg, "demo_pkg")) is None
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    cycle = find_cycle(import_graph(pkg, "demo_pkg"))
    assert cycle is not None and "demo_pkg.sub" in cycle  # b -> sub.c runs sub/__init__, which imports a


def test_each_subpackage_imports_only_layers_below_it(graph):
    wrong = []
    for module, targets in graph.items():
        group, layer = layer_of(module)
        for target in targets:
            if target == ROOT and module != ROOT:
                wrong.append(f"{module} imports the package root (import the defining module instead)")
                continue
            t_group, t_layer = layer_of(target)
            if t_group != group and t_layer >= layer:
                wrong.append(f"{module} (layer {layer}, {group}) imports {target} (layer {t_layer}, {t_group})")
    assert not wrong, "imports against the layer order:\n  " + "\n  ".join(sorted(wrong))


def _absolute_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


def test_commands_live_in_cli_and_the_library_parses_no_arguments():
    """No ``cli.py`` outside ``cli/`` and no argparse in a library module: every flag and command is
    declared in the ``cli`` package, so the library folders hold library code only."""
    stray = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("cli.py"))
    assert not stray, f"commands belong in cli/ (one module per command group): move {stray}"
    library = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "cli"]
    parsing = sorted(str(p.relative_to(PACKAGE)) for p in library if "argparse" in _absolute_imports(p))
    assert not parsing, f"argument parsing belongs in cli/: {parsing}"


def test_every_module_is_found_statically():
    """No dynamic imports of our own modules: the graph above would not see them."""
    dynamic = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == "__import__" or (name == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                                            and str(node.args[0].value).startswith((ROOT, "."))):
                    dynamic.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not dynamic


def test_package_top_holds_only_shared_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == {"taps", "timesteps", "checks", "conditioning", "build_info", "checkpoint"}


def test_every_subpackage_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 60, f"{init.parent.name}/__init__.py needs a docstring saying what it owns"
        if init.parent.name in LAYERS and init.parent.name not in ("assets", "viz", "cli", "models"):
            assert "import" in doc, f"{init.parent.name}/__init__.py must say what it may import"


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


@pytest.mark.parametrize("module, names", [
    ("cleandift_rt", ["Engine", "match", "project", "ProjectionHeads", "TAPS", "unet_taps", "build_info"]),
    ("cleandift_rt.models", ["write_tiny_base", "load_base", "load_student"]),
    ("cleandift_rt.features.extractor", ["ReferenceExtractor", "DiftExtractor"]),
    ("cleandift_rt.features.preprocess", ["prepare_images"]),
    ("cleandift_rt.formats", ["describe"]),
    ("cleandift_rt.build_info", ["build_info", "format_build_info"]),
])
def test_public_module_paths_stay_importable(module, names):
    mod = importlib.import_module(module)
    for name in names:
        assert callable(getattr(mod, name)) or getattr(mod, name), f"{module}.{name}"
