"""The task registry: every task module's tasks by name, a clear error for an
unknown name, and a task module dropped into the package found with no other
edit."""

import ast
import importlib
import os
import sys
import textwrap

import pytest

from tf_secondorder.bench import tasks
from tf_secondorder.bench.tasks import registry

PACKAGE_DIR = os.path.dirname(tasks.__file__)
UNKNOWN = "`task` must be one of \\['cifar10', 'digits-ae', .*\\]; received 'nope'"


def registered_in_sources():
    """{name: (steps, eval_every)} of every `@register(...)` in the package's
    files, read from their source rather than from the registry."""
    found = {}
    for file in sorted(os.listdir(PACKAGE_DIR)):
        if not file.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(PACKAGE_DIR, file)).read())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "register"
            ):
                keywords = {k.arg: k.value for k in node.keywords}
                found[ast.literal_eval(node.args[0])] = (
                    ast.literal_eval(keywords["steps"]),
                    ast.literal_eval(keywords["eval_every"]),
                )
    return found


def test_the_registry_lists_every_task_its_modules_register():
    in_sources = registered_in_sources()
    assert set(in_sources) >= {
        "digits-ae",
        "digits-cnn",
        "digits-logreg",
        "digits-mlp",
        "pydoc-lm",
        "pydoc-encoder",
        "pydoc-gpt2",
        "mnist",
        "cifar10",
    }
    assert tasks.names() == sorted(in_sources)
    for name, schedule in in_sources.items():
        assert tasks.default_schedule(name) == schedule
    assert tasks.names(offline=False) == ["cifar10", "mnist"]
    described = tasks.descriptions()
    assert list(described) == tasks.names()
    assert all(text.strip() and "\n" not in text for text in described.values())


@pytest.mark.parametrize(
    "lookup",
    [
        tasks.check_name,
        tasks.default_schedule,
        tasks.get_task,
        lambda name: tasks.get_task(name, steps=10, data_dir="/nowhere"),
    ],
)
def test_an_unknown_name_raises_an_error_naming_task(lookup):
    with pytest.raises(ValueError, match=UNKNOWN):
        lookup("nope")


def test_each_offline_task_builds_with_its_registered_schedule(data_dir):
    for name in tasks.names(offline=True):
        if name == "pydoc-gpt2" and importlib.util.find_spec("keras_hub") is None:
            continue  # keras-hub's own environment; tests/test_keras_hub.py
        steps, eval_every = tasks.default_schedule(name)
        task = tasks.get_task(name, data_dir=data_dir)
        assert (task.name, task.steps, task.eval_every) == (name, steps, eval_every)
        assert tasks.get_task(name, steps=7, data_dir=data_dir).steps == 7


@pytest.fixture
def dropped_in_module(tmp_path, monkeypatch):
    """A task module in a folder added to the package's path, and a registry
    that has not looked for modules yet (as in a fresh process)."""
    module = "tiny_sum"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from tf_secondorder.bench.tasks.registry import Task, register


            @register("tiny-sum", steps=6, eval_every=3, description="a test task")
            def tiny_sum(steps=6, data_dir=None):
                return Task(
                    name="tiny-sum",
                    steps=steps,
                    eval_every=3,
                    batch_size=1,
                    make_model=None,
                    make_dataset=None,
                    evaluate=None,
                    loss="mse",
                    info={"data_dir": data_dir},
                )
            """
        )
    )
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_discovered", False)
    yield f"{tasks.__name__}.{module}"
    sys.modules.pop(f"{tasks.__name__}.{module}", None)
    if hasattr(tasks, module):
        delattr(tasks, module)


def test_a_task_module_dropped_into_the_package_is_found(dropped_in_module):
    assert dropped_in_module not in sys.modules
    assert "tiny-sum" in tasks.names()
    assert dropped_in_module in sys.modules
    assert tasks.descriptions()["tiny-sum"] == "a test task"
    assert tasks.default_schedule("tiny-sum") == (6, 3)
    task = tasks.get_task("tiny-sum", data_dir="here")
    assert (task.steps, task.info) == (6, {"data_dir": "here"})


def test_a_name_registered_twice_is_refused():
    def other(steps, data_dir=None):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="`name` must be a task not registered"):
        registry.register(
            "digits-ae", steps=1, eval_every=1, description="a second digits-ae"
        )(other)
    assert tasks.default_schedule("digits-ae") == (2000, 50)


@pytest.mark.parametrize(
    "name, description, error",
    [
        ("", "a task", "`name` must be a non-empty string; received ''"),
        ("x", "two\nlines", "`description` must be one non-empty line"),
        ("x", " ", "`description` must be one non-empty line"),
    ],
)
def test_register_checks_its_arguments(name, description, error):
    with pytest.raises(ValueError, match=error):
        registry.register(name, steps=1, eval_every=1, description=description)
