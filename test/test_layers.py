"""Strict layers (issue 14): errors/version <- targets <- runtime, dialects <- passes <- compiler
<- tools and the package's face; the server sits on the runtime alone (runtime <- server <- tools). No module imports one of a higher layer, also inside a
function, and no modules import each other in a circle."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {"test", "bench", "examples", "scripts", "docs", "cmake", ".venv", ".git"}
LAYERS = {"errors": 0, "version": 0, "files": 0, "targets": 1, "runtime": 2, "dialects": 2, "passes": 3, "server": 3, "compiler": 4,
          "tools": 5, "": 5}


def _modules():
    """{module name relative to the package ('' for its __init__): file path}."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".") and not d.endswith(".egg-info")
                   and d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def _imports(name, path, modules):
    """The package's modules that `name` imports (at the top or inside functions)."""
    is_package = path.endswith("__init__.py")
    here = name.split(".") if name else []
    base_parts = here if is_package else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = base_parts[:len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                prefix = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "polyarch":
                prefix = node.module.split(".")[1:]
            else:
                continue
            # `from . import a, b` imports modules a and b; `from .m import f, g` imports module m
            named = {".".join(prefix + [a.name]) for a in node.names} & set(modules)
            found |= named or ({".".join(prefix)} & set(modules))
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "polyarch"} & set(modules)
    found.discard(name)
    return found


def _graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _layer(module):
    return LAYERS[module.split(".")[0]]


def test_server_stands_on_the_runtime_alone():
    """A deployment host has the runtime only: the server imports nothing of the compiler side."""
    graph = _graph()
    compiler_side = {"compiler", "passes", "dialects", "tools"}
    found = sorted(f"{m} imports {t}" for m, ts in graph.items() if m.split(".")[0] == "server"
                   for t in ts if t.split(".")[0] in compiler_side)
    assert found == []
    assert any(m.startswith("server.") for m in graph)


def test_no_import_runs_up_a_layer():
    graph = _graph()
    assert set(m.split(".")[0] for m in graph) <= set(LAYERS), "a top-level module without a layer: add it to LAYERS"
    upward = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                    for m, ts in graph.items() for t in ts if _layer(t) > _layer(m))
    assert upward == []


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert [sorted(c) for c in _cycles(_graph())] == []


def test_the_walk_sees_imports():
    """The walk itself: it finds top-level, relative, absolute and function-local imports."""
    graph = _graph()
    assert "runtime.executor" in graph["runtime.ray_executor"]  # inside functions
    assert "targets" in graph["passes.assign_devices"]  # `from ..targets import ...`
    assert "targets.profiles" in graph["passes.assign_devices"]  # `from ..targets import profiles as P`
    assert "compiler.driver" in graph[""]  # the package's face, inside compile()
    assert {"compiler.parameters", "compiler.tuning"} <= graph["compiler.build"]  # `from . import a, b`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


# compiler/ from the bottom up, as docs/architecture.md lists it: each imports only those before it
COMPILER_ORDER = ["options", "modules", "kernels", "iree", "importer", "causal_lm", "parameters", "bundle", "calibrate", "measured", "tuning", "planning",
                  "build", "lm", "verify", "grounding", "simulate", "fleet", "driver"]


def test_compiler_modules_in_order():
    graph = _graph()
    mods = sorted(m.split(".")[1] for m in graph if m.startswith("compiler."))
    assert mods == sorted(COMPILER_ORDER), "a compiler module is missing from COMPILER_ORDER (and the architecture document)"
    bad = [f"compiler.{m} imports {t}" for i, m in enumerate(COMPILER_ORDER) for t in sorted(graph[f"compiler.{m}"])
           if t.startswith("compiler.") and t.split(".")[1] not in COMPILER_ORDER[:i]]
    assert bad == []


MAX_LINES = 60


def test_no_function_over_60_lines():
    """Functions in passes/, compiler/ and runtime/ stay short enough to read as a few named
    steps (issue 14): decorators and the docstring count, as the file shows them."""
    long = []
    for folder in ("passes", "compiler", "runtime"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if f.endswith(".py"):
                path = os.path.join(ROOT, folder, f)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        n = node.end_lineno - node.lineno + 1
                        if n > MAX_LINES:
                            long.append(f"{folder}/{f}:{node.lineno} {node.name}: {n} lines")
    assert long == []


def test_every_name_in_all_exists():
    """A module's __all__ (its public face) names only what it defines or imports."""
    import importlib

    bad = []
    for name, path in _modules().items():
        if "__all__" in open(path).read():
            mod = importlib.import_module("polyarch" + ("." + name if name else ""))
            bad += [f"{name or 'polyarch'}.{n}" for n in mod.__all__ if not hasattr(mod, n)]
    assert bad == []
