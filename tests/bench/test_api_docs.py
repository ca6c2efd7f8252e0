"""The API reference builds with pdoc, and docstring references resolve.

README's development section builds it with `pdoc tf_secondorder -o docs/api`;
this test runs the same build into a temporary directory and fails on an
import error pdoc reports or on a backticked `tfso.X` / `tf_secondorder.X`
reference, in any docstring of the package, that names nothing.
"""

import importlib
import inspect
import pkgutil
import re
import warnings

import pytest

import tf_secondorder

pdoc = pytest.importorskip("pdoc")

# pdoc's own words when a module cannot be imported or `__all__` is wrong.
PDOC_FAILURES = (
    "Error importing",
    "Couldn't import",
    "Error loading",
    "Cannot find spec",
    "does not resolve",
)
REFERENCE = re.compile(r"`((?:tfso|tf_secondorder)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def package_modules():
    """Every module of the package, private ones too (docstrings are read by
    people whatever pdoc shows)."""
    names = [tf_secondorder.__name__]
    for info in pkgutil.walk_packages(
        tf_secondorder.__path__, prefix=f"{tf_secondorder.__name__}."
    ):
        names.append(info.name)
    return names


def resolve(reference):
    """The object a dotted `tfso.`/`tf_secondorder.` reference names, or raises."""
    parts = reference.split(".")
    parts[0] = "tf_secondorder"
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(reference)


def docstrings(module):
    """(qualified name, docstring) of a module and everything defined in it."""
    yield module.__name__, inspect.getdoc(module) or ""
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield f"{module.__name__}.{name}", inspect.getdoc(obj) or ""
            for attribute, member in vars(obj).items():
                member = getattr(member, "__func__", member)
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    yield (
                        f"{module.__name__}.{name}.{attribute}",
                        member.__doc__ or "",
                    )
        elif inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj.__doc__ or ""


def test_every_module_imports_and_its_references_resolve():
    broken = []
    for name in package_modules():
        module = importlib.import_module(name)  # an import error fails here
        for where, text in docstrings(module):
            for reference in REFERENCE.findall(text):
                try:
                    resolve(reference)
                except (ImportError, AttributeError):
                    broken.append(f"{where}: `{reference}`")
    assert not broken, "docstring references that name nothing:\n" + "\n".join(broken)


def test_the_reference_check_catches_a_wrong_name():
    assert resolve("tfso.callbacks.CommunicationStats") is not None
    assert resolve("tf_secondorder.bench.tasks.get_task") is not None
    with pytest.raises(AttributeError):
        resolve("tfso.Shampoo.no_such_method")
    with pytest.raises(AttributeError):
        resolve("tf_secondorder.no_such_module")


def test_pdoc_builds_the_reference(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("tf_secondorder", output_directory=tmp_path)
    failures = [
        str(w.message)
        for w in caught
        if any(marker in str(w.message) for marker in PDOC_FAILURES)
    ]
    assert not failures, "\n\n".join(failures)
    page = (tmp_path / "tf_secondorder.html").read_text()
    for name in ("Shampoo", "SOAP", "SignSGD", "distributed"):
        assert f'id="{name}"' in page
    assert (tmp_path / "index.html").exists()


def public_names():
    """(qualified name, object) of every name in a package `__all__` and of
    each public method or property its classes define in this package."""
    for name in package_modules():
        module = importlib.import_module(name)
        if not hasattr(module, "__path__"):
            continue  # `__all__` of the (sub)packages is the public API
        for exported in getattr(module, "__all__", []):
            obj = getattr(module, exported)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            yield f"{name}.{exported}", obj
            if not inspect.isclass(obj):
                continue
            for attribute in dir(obj):
                if attribute.startswith("_"):
                    continue
                member = inspect.getattr_static(obj, attribute, None)
                member = getattr(member, "__func__", member)
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) and member.__module__.startswith(
                    tf_secondorder.__name__
                ):
                    yield f"{name}.{exported}.{attribute}", getattr(obj, attribute)


def test_every_public_name_has_a_docstring():
    # inspect.getdoc takes an override's docstring from the method it
    # overrides, as pdoc shows it.
    bare = sorted(
        {where for where, obj in public_names() if not (inspect.getdoc(obj) or "")}
    )
    assert not bare, "public names without a docstring:\n" + "\n".join(bare)
