"""`python -m build` makes an sdist and a wheel holding every module, with the
version from `tf_secondorder.__version__` (its one place)."""

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import tf_secondorder

pytest.importorskip("build")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _copy_project(to):
    """The files a build reads, copied so that the build leaves no `build/` or
    `*.egg-info` in the working tree."""
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(ROOT, name), to / name)
    shutil.copytree(
        os.path.join(ROOT, "tf_secondorder"),
        to / "tf_secondorder",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )


def test_build_makes_an_sdist_and_a_wheel_with_every_module(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    _copy_project(project)
    # --no-isolation: the build backend (setuptools, wheel) is already here, so
    # nothing is downloaded; the wheel is built from the sdist, as pip would.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", "dist", "."],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    version = tf_secondorder.__version__
    wheels = list((project / "dist").glob("*.whl"))
    sdists = list((project / "dist").glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"tf_secondorder-{version}-py3-none-any.whl"]
    assert len(sdists) == 1

    modules = {
        os.path.relpath(os.path.join(d, f), project).replace(os.sep, "/")
        for d, _, files in os.walk(project / "tf_secondorder")
        for f in files
        if f.endswith(".py")
    }
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        info = f"tf_secondorder-{version}.dist-info"
        metadata = email.message_from_bytes(wheel.read(f"{info}/METADATA"))
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert modules <= names, sorted(modules - names)
    assert "tf_secondorder/bench/tfds_builders.py" in names
    assert metadata["Name"] == "tf-secondorder" and metadata["Version"] == version
    extras = metadata.get_all("Provides-Extra")
    assert {"cpu", "gpu", "bench", "test", "docs"} <= set(extras)
    assert "tf-secondorder = tf_secondorder.cli:console" in entry_points

    with tarfile.open(sdists[0]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
        # The top folder is tf-secondorder-V or tf_secondorder-V (newer setuptools).
        (top,) = {m.name.split("/", 1)[0] for m in sdist.getmembers()}
        pkg_info = sdist.extractfile(f"{top}/PKG-INFO").read()
    assert {"setup.cfg", "pyproject.toml", "README.md"} <= members
    assert modules <= members, sorted(modules - members)
    assert email.message_from_bytes(pkg_info)["Version"] == version
