"""No module of `tf_secondorder.bench` imports another in a cycle, counting
the imports inside functions too, so none is deferred to dodge one."""

import ast
import os

import tf_secondorder.bench

BENCH = os.path.dirname(tf_secondorder.bench.__file__)
PACKAGE = tf_secondorder.bench.__name__
TASKS = f"{PACKAGE}.tasks"
# What a task module may import inside a function: optional dependencies
# (and tfds_builders, which imports one), never another bench module.
OPTIONAL_IMPORTS = {
    "keras_hub",
    "tensorflow_datasets",
    f"{PACKAGE}.tfds_builders",
}


def bench_modules(root=BENCH):
    """{module name: path} of every module under tf_secondorder/bench."""
    modules = {}
    for folder, _, files in os.walk(root):
        for file in files:
            if not file.endswith(".py"):
                continue
            relative = os.path.relpath(os.path.join(folder, file), root)
            parts = relative[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([PACKAGE, *parts])] = os.path.join(folder, file)
    return modules


def imports(name, path, known):
    """(imported module, inside a function) for each import in `path`:
    `from P import m` names the module P.m when there is one, else P."""
    tree = ast.parse(open(path).read(), path)
    is_package = path.endswith("__init__.py")
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - child.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    module = f"{base}.{alias.name}"
                    found.append((module if module in known else base, nested))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph(root=BENCH):
    modules = bench_modules(root)
    graph, lazy = {}, {}
    for name, path in modules.items():
        edges = imports(name, path, modules)
        graph[name] = {target for target, _ in edges if target in modules} - {name}
        lazy[name] = {target for target, nested in edges if nested}
    return graph, lazy


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_graph_sees_the_task_modules_imports():
    graph, lazy = import_graph()
    assert f"{TASKS}.registry" in graph[f"{TASKS}.digits_ae"]
    assert f"{TASKS}.data" in graph[f"{TASKS}.pydoc_encoder"]
    assert f"{PACKAGE}.tfds_builders" in lazy[f"{TASKS}.data"]


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_bench_module_imports_another_in_a_cycle():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_task_modules_defer_only_optional_dependencies():
    _, lazy = import_graph()
    deferred = {
        (name, target)
        for name, targets in lazy.items()
        if name.startswith(TASKS)
        for target in targets
        if target not in OPTIONAL_IMPORTS
    }
    assert deferred == set()


def test_no_module_imports_a_task_module():
    """Task modules are leaves: removing one breaks no other module."""
    graph, _ = import_graph()
    modules = bench_modules()
    registering = {
        name
        for name, path in modules.items()
        if name.startswith(f"{TASKS}.") and "@register(" in open(path).read()
    }
    assert f"{TASKS}.digits_ae" in registering
    importers = {
        (name, target)
        for name, targets in graph.items()
        for target in targets & registering
    }
    assert importers == set()
