"""Every TensorRT name the project's code uses, found in its syntax tree, checked against a real surface.

``uses(sources, surface)`` walks the modules and records each attribute read, attribute write and
call on something known to be TensorRT; ``problems(uses, surface)`` says which the real module
lacks, which writes hit read-only properties, which calls no overload of the real pybind11
signature accepts (argument count, keyword names, and TensorRT-typed arguments against the
parameter's TensorRT type) and which calls throw away the ``bool`` by which TensorRT reports a
failure. ``surface`` is ``trt_surface.surface(version)``'s JSON.

What is known to be TensorRT (a small, flow-insensitive inference, iterated to a fixed point):
- the module: a name bound by ``import tensorrt [as X]``; what a project function returns when it
  returns the module (``import_tensorrt()``), also inside a tuple (``trt, cap, name =
  check_build_environment()``) and across files (``from .x import that_function``); ``self.X``
  assigned the module; a parameter that a call site passes the module;
- ``module.Name``: the class, function or value the real module has under that name;
- instances: ``trt.Class(...)``; a method's or property's result, typed by the return annotation
  of the real signature (``builder.create_network()`` -> ``INetworkDefinition``), so factories need
  no table; ``self.X`` and parameters assigned or passed such values; elements of lists and
  comprehensions of them (``layers = [network.get_layer(i) ...]``, ``layers[i]``, ``for layer in layers``).
The first type a name receives is kept. What stays untyped is not checked: dynamic
``getattr(trt, name)`` included.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

MODULE = ("module",)
TRT_PREFIXES = ("tensorrt_bindings.tensorrt.", "tensorrt.")
MAX_PASSES = 10


@dataclass(frozen=True)
class Use:
    where: str  # "path:line"
    owner: str  # "tensorrt" for the module, else a class qualname ("IBuilderConfig", "ILogger.Severity")
    name: str
    kind: str  # "get", "set" or "call"
    positional: tuple = ()  # argument types of a call (None where unknown)
    keywords: tuple = ()  # ((name, type), ...)
    unpacked: bool = False  # *args or **kwargs: the count cannot be checked
    discarded: bool = False  # a call whose result the code throws away (a statement of its own)

    @property
    def label(self) -> str:
        return f"{self.owner}.{self.name}"


def trt_type(annotation: str) -> str | None:
    """The class qualname of a TensorRT annotation (``tensorrt_bindings.tensorrt.ICudaEngine``), else None."""
    for prefix in TRT_PREFIXES:
        if annotation.startswith(prefix) and annotation[len(prefix):].replace(".", "").isidentifier():
            return annotation[len(prefix):]
    return None


class Surface:
    """Look-ups on ``trt_surface``'s JSON: attributes through base classes, signature matching."""

    def __init__(self, data: dict):
        self.data, self.module, self.classes = data, data["module"], data["classes"]

    def attr(self, owner: str, name: str) -> dict | None:
        if owner == "tensorrt":
            return self.module.get(name)
        entry = self.classes.get(owner)
        for qual in [owner, *(entry["bases"] if entry else [])]:
            found = self.classes.get(qual, {}).get("attrs", {}).get(name)
            if found is not None:
                return found
        return None

    def type_of(self, entry: dict | None, owner: str, name: str):
        """The inferred type of reading ``owner.name``."""
        if entry is None:
            return None
        kind = entry["kind"]
        if kind == "class":
            return ("class", entry["qualname"])
        if kind in ("method", "function"):
            return ("method", owner, name)
        if kind == "property":
            qual = trt_type(entry["type"])
            return ("inst", qual) if qual else None
        qual = entry.get("type", "")
        return ("inst", qual) if qual in self.classes else None

    def is_a(self, qual: str, wanted: str) -> bool:
        return qual == wanted or wanted in self.classes.get(qual, {}).get("bases", [])

    def accepts(self, sig: dict, use: Use) -> bool:
        """Whether one overload takes the call's arguments (count, names, TensorRT types)."""
        params = sig["params"]
        if use.unpacked or any(p["kind"] == "variadic" for p in params):
            return True
        if len(use.positional) > sum(p["kind"] != "keyword" for p in params):
            return False
        bound = {p["name"]: t for p, t in zip(params, use.positional)}
        by_name = {p["name"]: p for p in params}
        for name, t in use.keywords:
            p = by_name.get(name)
            if p is None or p["kind"] == "positional" or name in bound:
                return False
            bound[name] = t
        if any(not p["default"] and p["name"] not in bound for p in params):
            return False
        return all(self._compatible(t, by_name[n]["type"]) for n, t in bound.items())

    def _compatible(self, arg, annotation: str) -> bool:
        wanted = trt_type(annotation)
        if wanted is None or arg is None or wanted not in self.classes:
            return True
        if arg[0] == "inst":
            return self.is_a(arg[1], wanted)
        if arg[0] == "const":  # a literal where an enum is wanted: pybind11 enums take no plain ints
            return self.classes[wanted]["members"] is None
        return True

    def call_result(self, owner: str, name: str, use: Use):
        entry = self.attr(owner, name)
        for sig in (entry or {}).get("signatures", []):
            if self.accepts(sig, use):
                qual = trt_type(sig["returns"])
                return ("inst", qual) if qual else None
        return None


class _Scope:
    def __init__(self, file: str, key: str, cls: str | None, parent: _Scope | None):
        self.file, self.key, self.cls, self.parent = file, key, cls, parent


class _Analysis:
    def __init__(self, surface: Surface):
        self.surface = surface
        self.vars: dict[str, dict] = {}  # scope key -> {name: type}
        self.params: dict[str, dict] = {}  # function key -> {parameter: type from call sites}
        self.returns: dict[str, object] = {}  # function key -> type
        self.self_attrs: dict[tuple, dict] = {}  # (file, class) -> {attr: type}
        self.functions: dict[str, ast.AST] = {}  # function key -> its def
        self.methods: dict[tuple, dict] = {}  # (file, class) -> {name: key}
        self.exported: dict[str, str] = {}  # function name -> key, for `from ... import name` in other files
        self.uses: list[Use] = []
        self.changed = False

    # -- bindings (first type wins) --

    def _set(self, table: dict, name: str, t) -> None:
        if t is not None and table.get(name) is None:
            table[name] = t
            self.changed = True

    def lookup(self, scope: _Scope, name: str):
        while scope is not None:
            for table in (self.vars.get(scope.key, {}), self.params.get(scope.key, {})):
                if table.get(name) is not None:
                    return table[name]
            scope = scope.parent
        return None

    def assign(self, target, t, scope: _Scope) -> None:
        if isinstance(target, ast.Name):
            self._set(self.vars.setdefault(scope.key, {}), target.id, t)
        elif isinstance(target, ast.Attribute):
            if isinstance(target.value, ast.Name) and target.value.id == "self" and scope.cls:
                self._set(self.self_attrs.setdefault((scope.file, scope.cls), {}), target.attr, t)
            else:
                self.member(self.expr(target.value, scope), target.attr, scope, target, "set")
        elif isinstance(target, (ast.Tuple, ast.List)):
            n = len(target.elts)
            parts = t[1] if t is not None and t[0] == "tuple" and len(t[1]) == n else [None] * n
            for element, part in zip(target.elts, parts):
                self.assign(element, part, scope)
        else:
            self.expr(target, scope)

    # -- records --

    def record(self, scope: _Scope, node, owner: str, name: str, kind: str, **call) -> None:
        self.uses.append(Use(f"{scope.file}:{node.lineno}", owner, name, kind, **call))

    def member(self, owner, name: str, scope: _Scope, node, kind: str = "get"):
        if owner is None:
            return None
        if owner == MODULE:
            qual = "tensorrt"
        elif owner[0] in ("class", "inst"):
            qual = owner[1]
        else:
            return None
        self.record(scope, node, qual, name, kind)
        return self.surface.type_of(self.surface.attr(qual, name), qual, name)

    # -- the walk --

    def module(self, file: str, tree: ast.Module) -> None:
        scope = _Scope(file, f"{file}::", None, None)
        self.body(tree.body, scope)

    def body(self, statements, scope: _Scope) -> None:
        for statement in statements:
            self.stmt(statement, scope)

    @staticmethod
    def child_key(scope: _Scope, name: str) -> str:
        return f"{scope.key}{name}" if scope.key.endswith("::") else f"{scope.key}.{name}"

    def define(self, node, scope: _Scope, method_of: str | None = None) -> None:
        """A function or method: registered by key, its body walked in its own scope (closures see ``scope``)."""
        key = self.child_key(scope, node.name)
        self.functions[key] = node
        if method_of is not None:
            self.methods.setdefault((scope.file, method_of), {})[node.name] = key
        else:
            self._set(self.vars.setdefault(scope.key, {}), node.name, ("project", key))
            if scope.parent is None:
                self.exported.setdefault(node.name, key)
        for default in [*node.args.defaults, *node.args.kw_defaults, *node.decorator_list]:
            if default is not None:
                self.expr(default, scope)
        self.body(node.body, _Scope(scope.file, key, method_of or scope.cls, scope))

    def stmt(self, node, scope: _Scope) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tensorrt":
                    self._set(self.vars.setdefault(scope.key, {}), alias.asname or "tensorrt", MODULE)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if node.module == "tensorrt":
                    t = self.member(MODULE, alias.name, scope, node)
                elif alias.name in self.exported:
                    t = ("project", self.exported[alias.name])
                else:
                    continue
                self._set(self.vars.setdefault(scope.key, {}), alias.asname or alias.name, t)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.define(node, scope)
        elif isinstance(node, ast.ClassDef):
            class_scope = _Scope(scope.file, self.child_key(scope, node.name), None, scope)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.define(item, class_scope, method_of=node.name)
                else:
                    self.stmt(item, class_scope)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            if node.value is not None:
                t = self.expr(node.value, scope)
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    self.assign(target, t, scope)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            self.call(node.value, scope, discarded=True)
        elif isinstance(node, ast.Return):
            if node.value is not None:
                self._set(self.returns, scope.key, self.expr(node.value, scope))
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.assign(node.target, self.element(self.expr(node.iter, scope)), scope)
            self.body(node.body + node.orelse, scope)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                t = self.expr(item.context_expr, scope)
                if item.optional_vars is not None:
                    self.assign(item.optional_vars, t, scope)
            self.body(node.body, scope)
        else:
            self.generic(node, scope)

    def generic(self, node, scope: _Scope) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                self.stmt(child, scope)
            elif isinstance(child, ast.expr):
                self.expr(child, scope)
            else:
                self.generic(child, scope)

    def expr(self, node, scope: _Scope):
        if isinstance(node, ast.Name):
            return self.lookup(scope, node.id)
        if isinstance(node, ast.Constant):
            return ("const", type(node.value).__name__)
        if isinstance(node, ast.Tuple):
            return ("tuple", tuple(self.expr(e, scope) for e in node.elts))
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and scope.cls:
                key = self.methods.get((scope.file, scope.cls), {}).get(node.attr)
                if key is not None:
                    return ("project", key, "bound")
                return self.self_attrs.get((scope.file, scope.cls), {}).get(node.attr)
            return self.member(self.expr(node.value, scope), node.attr, scope, node)
        if isinstance(node, ast.Call):
            return self.call(node, scope)
        if isinstance(node, ast.List):
            found = [t for t in (self.expr(e, scope) for e in node.elts) if t is not None]
            return ("list", found[0]) if found else None
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            for comp in node.generators:
                self.assign(comp.target, self.element(self.expr(comp.iter, scope)), scope)
                for condition in comp.ifs:
                    self.expr(condition, scope)
            t = self.expr(node.elt, scope)
            return ("list", t) if t is not None else None
        if isinstance(node, ast.Subscript):
            container, index = self.expr(node.value, scope), node.slice
            self.expr(index, scope)
            if container and container[0] == "tuple" and isinstance(index, ast.Constant) and type(index.value) is int:
                items = container[1]
                return items[index.value] if -len(items) <= index.value < len(items) else None
            return self.element(container)
        self.generic(node, scope)
        return None

    @staticmethod
    def element(container):
        """The type of one element of a typed list (``[network.get_layer(i) for i in ...]``), else None."""
        return container[1] if container is not None and container[0] == "list" else None

    def call(self, node: ast.Call, scope: _Scope, discarded: bool = False):
        f = self.expr(node.func, scope)
        positional = tuple(self.expr(a.value if isinstance(a, ast.Starred) else a, scope) for a in node.args)
        keywords = tuple((k.arg, self.expr(k.value, scope)) for k in node.keywords)
        unpacked = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        if f is None:
            return None
        shape = dict(positional=positional, keywords=keywords, unpacked=unpacked)
        if f[0] == "class":
            self.record(scope, node, f[1], "__init__", "call", **shape)
            return ("inst", f[1])
        if f[0] == "method":
            self.record(scope, node, f[1], f[2], "call", discarded=discarded, **shape)
            return self.surface.call_result(f[1], f[2], Use("", f[1], f[2], "call", **shape))
        if f[0] == "project":
            self.pass_arguments(f[1], positional, keywords, bound=len(f) > 2)
            return self.returns.get(f[1])
        return None

    def pass_arguments(self, key: str, positional, keywords, bound: bool) -> None:
        fn = self.functions.get(key)
        if fn is None:
            return
        names = [a.arg for a in [*fn.args.posonlyargs, *fn.args.args]][1 if bound else 0:]
        table = self.params.setdefault(key, {})
        for name, t in [*zip(names, positional), *keywords]:
            if name is not None:
                self._set(table, name, t)


def uses(sources: dict[str, str], surface: Surface) -> list[Use]:
    """The TensorRT uses in ``{file label: source}`` (all analysed together, so imports across them resolve)."""
    trees = {name: ast.parse(text, filename=name) for name, text in sources.items()}
    analysis = _Analysis(surface)
    for _ in range(MAX_PASSES):
        analysis.uses, analysis.changed = [], False
        for name, tree in trees.items():
            analysis.module(name, tree)
        if not analysis.changed:
            break
    return sorted(set(analysis.uses), key=lambda u: (u.where, u.label, u.kind))


def problems(found: list[Use], surface: Surface) -> list[str]:
    """One line per use the real module does not allow."""
    out = []
    for use in found:
        entry = surface.attr(use.owner, use.name)
        if entry is None:
            out.append(f"{use.where}: {use.label} does not exist in TensorRT {surface.data['version']}")
        elif use.kind == "set" and not (entry["kind"] == "property" and entry["writable"]):
            out.append(f"{use.where}: {use.label} cannot be assigned (not a writable property)")
        elif use.kind == "call":
            sigs = entry.get("signatures", [])
            accepted = [sig for sig in sigs if surface.accepts(sig, use)]
            if not accepted:
                real = " | ".join("(" + ", ".join(p["name"] for p in s["params"]) + ")" for s in sigs) or "none"
                out.append(f"{use.where}: {use.label} called with {len(use.positional)} positional and keywords "
                           f"{[k for k, _ in use.keywords]}; the real signatures take {real}")
            elif use.discarded and accepted[0]["returns"] == "bool":
                out.append(f"{use.where}: {use.label} returns whether it succeeded (bool) and the code ignores it")
    return sorted(set(out))


def deprecated(found: list[Use], surface: Surface) -> set[str]:
    """Labels of the uses the real module documents as deprecated."""
    return {u.label for u in found if (surface.attr(u.owner, u.name) or {}).get("deprecated")}


def project_sources(root: Path) -> dict[str, str]:
    """The project's modules that use TensorRT: those importing it, and those importing a function of theirs.

    Which functions hand TensorRT out is decided by the analysis itself, so a module that only
    calls ``import_tensorrt()`` from another file is found too (iterated until no file is added).
    """
    files = sorted(p for folder in ("python", "export", "bench") for p in (root / folder).rglob("*.py"))
    texts = {str(p.relative_to(root)): p.read_text() for p in files}
    trees = {name: ast.parse(text) for name, text in texts.items()}

    def imports(tree, names) -> bool:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "tensorrt" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and (node.module == "tensorrt"
                                                     or any(a.name in names for a in node.names)):
                return True
        return False

    chosen: dict[str, str] = {}
    handed_out: set[str] = set()
    while True:
        added = {n: texts[n] for n, tree in trees.items() if n not in chosen and imports(tree, handed_out)}
        if not added:
            return chosen
        chosen.update(added)
        analysis = _Analysis(Surface({"version": "", "module": {}, "classes": {}}))
        for _ in range(MAX_PASSES):
            analysis.changed = False
            for name in chosen:
                analysis.module(name, trees[name])
            if not analysis.changed:
                break
        handed_out = {key.rsplit("::", 1)[1] for key, t in analysis.returns.items()
                      if t == MODULE or (t and t[0] == "tuple" and MODULE in t[1])}


def _fake_signature_matches(fn, sigs: list[dict]) -> bool:
    """The fake's parameters are a prefix of one real overload's (names in order, defaults only where the real
    has them), and the real parameters it leaves out all have defaults."""
    import inspect

    params = list(inspect.signature(fn).parameters.values())[1:]  # self
    for sig in sigs:
        real = sig["params"]
        if len(params) > len(real) or any(not r["default"] for r in real[len(params):]):
            continue
        if all(p.name == r["name"] and (p.default is inspect.Parameter.empty or r["default"])
               for p, r in zip(params, real)):
            return True
    return False


def fake_problems(fake, surface: Surface) -> list[str]:
    """What a fake module (tests/fake_tensorrt.py) offers that the real module of its version lacks or
    spells otherwise: classes, methods with their signatures, properties, enum members with their values.
    Checked: the fake's own classes and everything in their bodies but names starting with ``_`` (``__init__``
    is checked where the real class has a constructor) and ``fake.FAKE_ONLY``."""
    version = surface.data["version"]
    out = [] if fake.__version__ == version else [f"the fake claims {fake.__version__}, the real module is {version}"]
    for cls in [v for v in vars(fake).values() if isinstance(v, type) and v.__module__ == fake.__name__]:
        real = surface.module.get(cls.__name__)
        if real is None or real["kind"] != "class":
            out.append(f"{cls.__name__}: TensorRT {version} has no such class")
            continue
        for name, value in vars(cls).items():
            if (name.startswith("_") and name != "__init__") or name in fake.FAKE_ONLY:
                continue
            where, entry = f"{cls.__name__}.{name}", surface.attr(real["qualname"], name)
            if entry is None:
                out.append(f"{where} does not exist in TensorRT {version}")
            elif name == "__init__" and not entry["signatures"]:
                continue  # only TensorRT creates these objects; the fake's constructor is its own
            elif isinstance(value, property):
                if entry["kind"] != "property":
                    out.append(f"{where} is a property in the fake, a {entry['kind']} in TensorRT {version}")
            elif callable(value):
                if entry["kind"] != "method" or not _fake_signature_matches(value, entry["signatures"]):
                    real_sigs = [[p["name"] for p in s["params"]] for s in entry.get("signatures", [])]
                    out.append(f"{where}: the fake's signature matches no real one ({real_sigs})")
            elif entry["kind"] == "property":
                if not entry["writable"]:
                    out.append(f"{where} is a plain (writable) attribute in the fake, read-only in TensorRT {version}")
            elif "int" in entry and value != entry["int"]:
                out.append(f"{where} = {value!r} in the fake, {entry['int']} in TensorRT {version}")
    return out
