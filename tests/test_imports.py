"""The package's import graph has no cycle, and every module imports on its own."""
import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "schedsearch"


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path) -> set[str]:
    """The package's modules that `path` imports anywhere (functions too: an import there is a dependency
    all the same), less those under `if TYPE_CHECKING:` (never executed) and less its own parent packages
    (importing a submodule imports them first; that is no cycle)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree)
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            found = submodules or [base]
        else:
            continue
        out |= {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that comes back to its start) per back edge a depth-first walk finds."""
    found, state = [], {}

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return found


def test_the_import_graph_has_no_cycle():
    graph = {name: imported_modules(path) for name, path in MODULES.items()}
    assert "schedsearch.options" in graph["schedsearch.compare"]  # the walk sees imports (in functions too)
    assert "schedsearch.strategies.proposals" in graph["schedsearch.strategies.llm"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_each_module_imports_alone():
    """In a fresh interpreter, each module after none of the package's others (TVM and torch stay loaded
    between them: a process per module would cost their import ~28 times)."""
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    for loaded in [m for m in sys.modules if m == 'schedsearch' or m.startswith('schedsearch.')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n"
              "    print(name)\n")
    p = subprocess.run([sys.executable, "-c", script, *MODULES], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == list(MODULES)
