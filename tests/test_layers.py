"""The package's layers point one way: the `pdm` command (`cli.py`, `commands/`) is built on the library, never the
other way round, and no module of the package imports itself back through another. Read from the source with `ast`,
imports inside functions included (a lazy import closes a circle as surely as one at the top), those under
`if TYPE_CHECKING:` left out (they never run)."""

import ast
import os

PACKAGE = "progressive_denoising"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
COMMAND_LAYER = (f"{PACKAGE}.cli", f"{PACKAGE}.commands")


def package_modules():
    """{dotted module name: source file} of every module of the package (a package is its `__init__`)."""
    modules = {}
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3].split(os.sep)
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, name)
    return modules


def _type_checking_only(node):
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(tree):
    """Every import statement of `tree`, wherever it stands, except under `if TYPE_CHECKING:`."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        pending.extend(child for child in ast.iter_child_nodes(node) if not _type_checking_only(child))


def imported_modules(name, path, modules):
    """The package modules that module `name` (its source at `path`) imports."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in _import_nodes(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import x` imports the submodule x when there is one, else a name of the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found.update(target for target in targets if target in modules and target != name)
    return found


def import_graph():
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def in_command_layer(name):
    return any(name == layer or name.startswith(layer + ".") for layer in COMMAND_LAYER)


def find_cycle(graph):
    """One import circle of `graph` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_only_the_command_layer_imports_it():
    graph = import_graph()
    assert f"{PACKAGE}.commands.base" in graph and f"{PACKAGE}.tokenize_data" in graph  # the walk found the package
    wrong = {name: sorted(filter(in_command_layer, targets)) for name, targets in graph.items()
             if not in_command_layer(name) and any(map(in_command_layer, targets))}
    assert not wrong, f"library modules import the command layer: {wrong}"


def test_no_module_of_the_package_imports_itself_back():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_graph_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert f"{PACKAGE}.vq" in graph[f"{PACKAGE}.tokenize_data"]  # `from .vq import ...` inside a function
    assert f"{PACKAGE}.errors" in graph[f"{PACKAGE}.pdm_shapes.data"]  # `from ..errors import ...`
    assert f"{PACKAGE}.commands.base" in graph[f"{PACKAGE}.commands.tokenize"]  # `from .base import ...`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
