"""The multi-worker launcher: TF_CONFIG, output, failures, restarts, rate limit."""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from tf_secondorder import cli
from tf_secondorder.distribute import launch as launcher


def _script(tmp_path, body):
    path = tmp_path / "worker.py"
    path.write_text(
        "import json, os, sys, time\n"
        "INDEX = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        + textwrap.dedent(body)
    )
    return [sys.executable, str(path)]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_each_worker_gets_its_tf_config_and_prefixed_output(tmp_path):
    command = _script(
        tmp_path,
        f"""
        open(os.path.join({str(tmp_path)!r}, f"cfg{{INDEX}}.json"), "w").write(
            os.environ["TF_CONFIG"])
        print("hello from", INDEX, os.environ["TFSO_NUM_WORKERS"])
        """,
    )
    out = io.StringIO()
    assert launcher.launch(command, workers=3, out=out) == 0
    configs = [json.loads((tmp_path / f"cfg{i}.json").read_text()) for i in range(3)]
    addresses = configs[0]["cluster"]["worker"]
    assert len(set(addresses)) == 3
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    for i, config in enumerate(configs):
        assert config["cluster"]["worker"] == addresses
        assert config["task"] == {"type": "worker", "index": i}
        assert f"[worker {i}] hello from {i} 3\n" in out.getvalue()


def test_a_failing_worker_fails_the_launch_and_leaves_no_process(tmp_path):
    pids = tmp_path / "pids"
    command = _script(
        tmp_path,
        f"""
        import subprocess
        if INDEX == 1:
            # Fail only once worker 0 and its child are running (a slow
            # start on a loaded machine must not leave nothing to check).
            while not os.path.exists({str(pids)!r}):
                time.sleep(0.05)
            sys.exit(3)
        child = subprocess.Popen(["sleep", "120"])
        with open({str(pids)!r} + ".tmp", "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}\\n")
        os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
        time.sleep(120)
        """,
    )
    out = io.StringIO()
    start = time.monotonic()
    assert launcher.launch(command, workers=2, out=out, grace=2.0) == 3
    assert time.monotonic() - start < 30
    assert "worker 1 exited with 3" in out.getvalue()
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 2
    assert [p for p in recorded if _alive(p)] == []


def test_killed_worker_reports_signal_and_timeout_stops_everyone(tmp_path):
    command = _script(
        tmp_path,
        """
        import signal
        if INDEX == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
        """,
    )
    assert launcher.launch(command, workers=2, out=io.StringIO(), grace=1.0) == 137
    sleeper = _script(tmp_path, "time.sleep(60)\n")
    start = time.monotonic()
    assert launcher.launch(sleeper, workers=2, timeout=1.5, out=io.StringIO()) == 124
    assert time.monotonic() - start < 15


def test_restart_after_failure(tmp_path):
    command = _script(
        tmp_path,
        """
        attempt = int(os.environ["TFSO_RESTART"])
        print("attempt", attempt)
        sys.exit(5 if (attempt == 0 and INDEX == 0) else 0)
        """,
    )
    out = io.StringIO()
    assert launcher.launch(command, workers=2, max_restarts=1, out=out) == 0
    assert "[launch] restart 1 of 1" in out.getvalue()
    assert "[worker 1] attempt 1" in out.getvalue()
    assert launcher.launch(command, workers=2, max_restarts=0, out=out) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"workers": 0}, "`workers` must be an integer >= 1"),
        ({"workers": 1.5}, "`workers` must be an integer >= 1"),
        ({"timeout": -1}, "`timeout` must be > 0"),
        ({"max_restarts": -1}, "`max_restarts` must be an integer >= 0"),
        ({"rate": "fast"}, "`rate` must be a positive tc rate"),
        ({"rate": "0mbit"}, "`rate` must be a positive tc rate"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        launcher.launch([sys.executable, "-c", "pass"], **kwargs)


def test_rate_parsing():
    assert launcher.rate_bits_per_second("100mbit") == 1e8
    assert launcher.rate_bits_per_second("1gbit") == 1e9
    assert launcher.rate_bits_per_second("2.5Kbit") == 2500


def test_rate_without_root_says_so(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(launcher.LaunchError, match="--rate needs root"):
        launcher.launch([sys.executable, "-c", "pass"], rate="1gbit")
    code = cli.main(["launch", "--rate", "1gbit", "--", sys.executable, "-c", "0"])
    assert code == 2


def test_cli_launch(tmp_path, capsys):
    command = _script(tmp_path, "sys.exit(0 if INDEX == 0 else 4)\n")
    assert cli.main(["launch", "--workers", "2", "--"] + command) == 4
    assert cli.main(["launch", "--workers", "2"]) == 2
    assert "give the command after --" in capsys.readouterr().err
    assert cli.main(["launch", "--rate", "quick", "--", "true"]) == 2
    assert "`rate` must be a positive tc rate" in capsys.readouterr().err


def _netns_names():
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def _can_make_namespaces():
    """Root, `ip` and `tc`, and a namespace whose loopback takes a tbf qdisc."""
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
        return False
    name = f"tfso-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True)
    try:
        shaped = subprocess.run(
            ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo"]
            + ["root", "tbf", "rate", "10mbit", "burst", "32kbit", "latency", "50ms"],
            capture_output=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made.returncode == 0 and shaped.returncode == 0


@pytest.mark.skipif(
    not _can_make_namespaces(), reason="network namespaces need root (CAP_SYS_ADMIN)"
)
def test_rate_limited_network_is_real_and_removed(tmp_path):
    """Worker 1 sends 2 MB to worker 0 over a 10 Mbit/s loopback: >= ~1.4 s."""
    result = tmp_path / "seconds"
    command = _script(
        tmp_path,
        f"""
        import socket
        port = int(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"][0].split(":")[1])
        payload = 2_000_000
        if INDEX == 0:
            server = socket.create_server(("127.0.0.1", port))
            conn, _ = server.accept()
            start, got = time.monotonic(), 0
            while got < payload:
                got += len(conn.recv(1 << 16))
            open({str(result)!r}, "w").write(str(time.monotonic() - start))
        else:
            for _ in range(100):
                try:
                    sock = socket.create_connection(("127.0.0.1", port))
                    break
                except ConnectionRefusedError:
                    time.sleep(0.05)
            sock.sendall(b"x" * payload)
            sock.close()
        """,
    )
    before = _netns_names()
    assert launcher.launch(command, workers=2, rate="10mbit", out=io.StringIO()) == 0
    seconds = float(result.read_text())
    # 16 Mbit at 10 Mbit/s is 1.6 s; the first 128 KiB burst passes at once.
    assert seconds > 1.3, seconds
    assert _netns_names() == before
    start = time.monotonic()
    assert launcher.launch(command, workers=2, out=io.StringIO()) == 0
    assert float(result.read_text()) < 0.5
    assert time.monotonic() - start < 30


def test_sigterm_to_the_launcher_stops_the_workers(tmp_path):
    pids = tmp_path / "pids"
    worker = tmp_path / "sleeper.py"
    worker.write_text(
        f"import os, time\nopen({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "time.sleep(120)\n"
    )
    launch = subprocess.Popen(
        [sys.executable, "-m", "tf_secondorder.cli", "launch", "--workers", "2"]
        + ["--", sys.executable, str(worker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pids.exists() and len(pids.read_text().split()) == 2:
            break
        time.sleep(0.1)
    launch.terminate()
    assert launch.wait(timeout=30) == 130
    assert [p for p in map(int, pids.read_text().split()) if _alive(p)] == []
