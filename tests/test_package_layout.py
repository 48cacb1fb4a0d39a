"""The package's shape: no import cycles, the engine of jrft.train reads no config, no private names cross
packages. Read from the source (AST), function-level imports included: an import inside a function closes a
cycle just as well, only later."""

import ast
import pathlib

import jrft

ROOT = pathlib.Path(jrft.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in ast.walk(node):
                lines.add(getattr(child, "lineno", -1))
    return lines


def _imports(name: str) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every executed ``jrft`` import of module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    skip = _type_checking_lines(tree)
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", -1) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "jrft"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "jrft":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None) if sub in MODULES else (base, alias.name))
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(name) if m in MODULES and m != name} for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    graph = _graph()
    assert "jrft.train.runs" in graph["jrft.commands.train"]  # imported inside run()
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_engine_reads_no_config():
    """Modules of jrft.train outside jrft.train.runs take explicit values: no jrft.config, no run builders."""
    engine = [n for n in MODULES if n.startswith("jrft.train") and not n.startswith("jrft.train.runs")]
    assert "jrft.train.step" in engine and "jrft.train.grpo_round" in engine
    for name in engine:
        imported = {m for m, _ in _imports(name)}
        assert not any(m == "jrft.config" or m.startswith("jrft.train.runs") for m in imported), name


def test_no_private_names_across_packages():
    for name in MODULES:
        top = name.split(".")[:2]
        for module, attr in _imports(name):
            if (
                attr is not None
                and attr.startswith("_")
                and not attr.startswith("__")
                and module.split(".")[:2] != top
            ):
                raise AssertionError(f"{name} imports the private {module}.{attr}")
