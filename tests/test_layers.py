"""The package's layers: no module imports one of a higher layer, and no
modules import each other in a cycle. Imports inside functions count, so
none can be deferred to hide either."""

import ast
import os

import tf_secondorder

ROOT = os.path.dirname(tf_secondorder.__file__)
PACKAGE = tf_secondorder.__name__

# Lower layers know nothing of higher ones: pure maths, then the private-API
# and kernel pieces built on it, the communication layer, Keras callbacks and
# data, the optimizers, the package's public face, the benchmarks, the CLI.
LAYERS = {
    "validation": 0,
    "_backend": 0,
    "linalg": 1,
    "compression": 1,
    "preconditioning": 2,
    "compat": 2,
    "distribute": 3,
    "callbacks": 4,
    "data": 4,
    "optimizers": 5,
    "": 6,  # tf_secondorder/__init__.py
    "bench": 7,
    "cli": 8,
}


def modules():
    """{module name: path} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for file in files:
            if file.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, file), ROOT)
                parts = relative[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join([PACKAGE, *parts])] = os.path.join(folder, file)
    return found


def import_graph():
    """{module: modules of the package it imports, anywhere in its code}."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                PACKAGE
            ):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in known else node.module)
            elif isinstance(node, ast.Import):
                targets.update(
                    a.name for a in node.names if a.name.split(".")[0] == PACKAGE
                )
        graph[name] = targets & set(known)
    return graph


def layer(module):
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def cycles(graph):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_subpackage_has_a_layer():
    assert {m.split(".")[1] if "." in m else "" for m in modules()} <= set(LAYERS)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{a} -> {b}"
        for a, targets in import_graph().items()
        for b in sorted(targets)
        if layer(b) > layer(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_modules_import_each_other_in_a_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    assert layer(f"{PACKAGE}.optimizers.base") > layer(f"{PACKAGE}.distribute.config")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    # A function-level import is seen (bench.arguments defers TensorFlow).
    assert f"{PACKAGE}.bench.optimizers" in graph[f"{PACKAGE}.bench.arguments"]
