"""The shape of the code: data flows one way (no import cycle between modules or between packages), functions are
short enough to read at once, and the ComfyUI nodes use only the engine's public API."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 60


def _modules(package: str) -> dict[str, str]:
    """module name → path, for every .py file under `package`."""
    out = {}
    for folder, _, names in os.walk(os.path.join(ROOT, package)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports (relative imports resolved, `from pkg import submodule` too)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base in known:
                found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return found - {module}


def _cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _graph():
    modules = _modules("quant_core")
    return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or module in _packages() else module


def _packages() -> set[str]:
    return {m for m, p in _modules("quant_core").items() if p.endswith("__init__.py")}


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    """Top-level parts of quant_core (io, select, transform, calib, quantization, cli, and the modules beside them)
    import each other one way only; the package's own __init__ (the lazy public API) is left out."""
    graph: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        if module == "quant_core":
            continue
        source = _package_of(module)
        graph.setdefault(source, set()).update(
            _package_of(i) for i in imported if i != "quant_core" and _package_of(i) != source)
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_functions_are_short():
    long = []
    for package in ("quant_core", "nodes"):
        for module, path in _modules(package).items():
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def test_nodes_use_only_the_public_api():
    for module, path in _modules("nodes").items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quant_core."):
                raise AssertionError(f"{module} imports {node.module}: use `from .. import quant_core`")
