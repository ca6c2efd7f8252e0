"""Every command the docs print still runs: each `tf-secondorder ...` line of
README.md, docs/*.md and tools/README.md passes the command's own argument
checks (names, options, values), stopped just before its first piece of
work, and every `python tools/...`, `python examples/...` and
`bash tools/...` names a file that exists."""

import os
import re
import shlex

import pytest

from tf_secondorder import cli
from tf_secondorder.bench import command as bench_command
from tf_secondorder.bench import communication_bytes, multiworker, scale, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "tools/README.md"] + sorted(
    os.path.join("docs", f)
    for f in os.listdir(os.path.join(ROOT, "docs"))
    if f.endswith(".md")
)
STARTS = ("tf-secondorder ", "python tools/", "python examples/", "bash tools/")

# Placeholders the docs use inside commands, and a value that stands for them.
PLACEHOLDERS = {
    r"--task name\b": "--task digits-ae",
    r"KEY=VALUE": "epsilon=1e-4",
    r"refresh_delay=D\b": "refresh_delay=10",
    r"bench_out/t1_delay_D\b": "bench_out/t1_delay_10",
    r"--precision P\b": "--precision float32",
    r"--workers W\b": "--workers 2",
    r"--rates? R\b": "--rate 1gbit",
    r"--settings S\b": "--settings fp32",
    r"--heartbeat-timeout S\b": "--heartbeat-timeout 60",
    r"--data-dir DIR\b": "--data-dir tfds_data",
    r"--average-from STEP\b": "--average-from 100",
}


def doc_commands():
    """(file, command) for every command line in the docs."""
    found = []
    for name in DOCS:
        text = open(os.path.join(ROOT, name)).read()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r"\s+#\s", line.strip())[0]
                if line.startswith(STARTS):
                    found.append((name, line))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            if span.startswith(STARTS):
                found.append((name, span))
    return found


COMMANDS = doc_commands()


def test_the_docs_hold_commands_of_every_kind():
    # The collection itself can fail silently (a changed fence, say); this
    # keeps it honest.
    kinds = {c.split()[1] for _, c in COMMANDS if c.startswith("tf-secondorder")}
    assert {"bench", "scale", "bytes", "multiworker", "launch"} <= kinds
    assert len(COMMANDS) > 50


class _Checked(Exception):
    """Raised where a command's first piece of work would start."""


def _stop(*args, **kwargs):
    raise _Checked


@pytest.fixture
def stopped_before_work(monkeypatch):
    from tf_secondorder.bench import tfds_builders
    from tf_secondorder.distribute import launch as launcher

    monkeypatch.setattr(tasks, "get_task", _stop)
    monkeypatch.setattr(tfds_builders, "prepare", _stop)
    # The replica count's logical devices are set up by a fresh process of
    # the command; this one already has its two.
    monkeypatch.setattr(bench_command, "logical_strategy", lambda n: None)
    monkeypatch.setattr(scale, "run", _stop)
    monkeypatch.setattr(communication_bytes.subprocess, "run", _stop)
    monkeypatch.setattr(multiworker, "driver", _stop)
    monkeypatch.setattr(launcher, "launch", _stop)


def _substituted(command):
    for pattern, value in PLACEHOLDERS.items():
        command = re.sub(pattern, value, command)
    left = [t for t in shlex.split(command) if re.fullmatch(r"[A-Z][A-Z_]*", t)]
    assert not left, f"unknown placeholder {left} in {command!r}: add it above"
    return command


@pytest.mark.parametrize(
    "where, command",
    [c for c in COMMANDS if c[1].startswith("tf-secondorder")],
    ids=lambda c: c[:60] if isinstance(c, str) else None,
)
def test_the_command_passes_its_checks(where, command, stopped_before_work, tmp_path):
    argv = shlex.split(_substituted(command))[1:]
    if argv in ([], ["--help"]) or argv[-1] == "--help" or argv == ["launch"]:
        argv = argv[:1] + ["--help"] if argv else ["--help"]
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0, (where, command)
        return
    if argv == ["bench"]:
        argv = ["bench", "--out", str(tmp_path)]
    if argv[0] == "launch" and "--" not in argv:
        argv += ["--", "python", "train.py"]  # a sentence naming an option
    try:
        cli.main(argv)
    except _Checked:
        return
    raise AssertionError(f"{where}: {command!r} did not reach its work")


@pytest.mark.parametrize(
    "where, command",
    [c for c in COMMANDS if not c[1].startswith("tf-secondorder")],
    ids=lambda c: c[:60] if isinstance(c, str) else None,
)
def test_scripts_the_docs_name_exist(where, command):
    script = shlex.split(command)[1]
    assert os.path.isfile(os.path.join(ROOT, script)), (where, command)
