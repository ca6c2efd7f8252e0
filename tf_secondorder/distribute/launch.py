"""Start N MultiWorkerMirroredStrategy workers on 127.0.0.1.

`launch(["python", "train.py"], workers=2)` picks free ports, gives each
worker process its own `TF_CONFIG`, streams every worker's output with a
`[worker i]` prefix and returns 0 only when every worker exits with 0. When a
worker fails, the launch times out or the user presses Ctrl-C, all workers
(and their children) are stopped before `launch` returns.

With `rate="1gbit"` the workers run inside a private network namespace whose
loopback is shaped by a token bucket (`tc qdisc ... tbf`); every byte between
workers then crosses one link of that rate, shared by both directions. This
needs root; the namespace is deleted afterwards.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class LaunchError(RuntimeError):
    """The workers could not be started as asked (not a worker failure)."""


def free_ports(count, host="127.0.0.1"):
    """`count` distinct TCP ports that were free on `host` a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index, host="127.0.0.1"):
    """The `TF_CONFIG` JSON string for worker `index` of a local cluster."""
    cluster = {"worker": [f"{host}:{port}" for port in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def rate_bits_per_second(rate):
    """Parse a tc-style rate such as "100mbit" or "1gbit" into bits/s."""
    match = _RATE.match(str(rate).strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"`rate` must be a positive tc rate such as '100mbit' or '1gbit' "
            f"(units bit, kbit, mbit, gbit); got {rate!r}"
        )
    return float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]


class RateLimitedNamespace:
    """A network namespace whose loopback is limited to `rate` (context manager)."""

    def __init__(self, rate, latency="50ms"):
        self.bits_per_second = rate_bits_per_second(rate)
        self.rate = rate
        self.latency = latency
        self.name = f"tfso-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    @staticmethod
    def check_available():
        if os.geteuid() != 0:
            raise LaunchError(
                "--rate needs root: it creates a private network namespace "
                "(`ip netns add`) and shapes its loopback with `tc`. Run as "
                "root, or launch without --rate."
            )
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise LaunchError(
                    f"--rate needs the `{tool}` command (Debian package iproute2)."
                )

    def __enter__(self):
        self.check_available()
        # The bucket must hold at least one loopback frame (64 KiB) and about
        # 10 ms of traffic, or tbf drops packets instead of pacing them.
        burst = max(int(self.bits_per_second / 8 / 100), 128 * 1024)
        _run(["ip", "netns", "add", self.name])
        try:
            _run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"])
            _run(
                ["ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", "lo"]
                + ["root", "tbf", "rate", str(self.rate), "burst", str(burst)]
                + ["latency", self.latency]
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def wrap(self, command):
        return ["ip", "netns", "exec", self.name] + list(command)

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _run(command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")


def _stream(pipe, prefix, out, lock):
    for line in iter(pipe.readline, b""):
        text = line.decode("utf-8", "replace").rstrip("\n")
        with lock:
            out.write(f"{prefix}{text}\n")
            out.flush()
    pipe.close()


def _stop(processes, grace):
    """SIGTERM every worker's process group, then SIGKILL what is left."""
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in processes:
        try:
            # The group may outlive its leader (children of the script).
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
    # SIGKILL is delivered asynchronously: a child of a worker can still be
    # running for a moment after killpg returns, so `launch` would return
    # with a live process. Wait until every group has only zombies left.
    deadline = time.monotonic() + max(grace, 5.0)
    while any(_group_running(p.pid) for p in processes):
        if time.monotonic() > deadline:
            warnings.warn(
                f"a worker's process is still running {max(grace, 5.0):g} s "
                "after SIGKILL to its group",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        time.sleep(0.01)


def _group_running(pgid):
    """Whether a process of group `pgid` is still running (zombies are not)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # No procfs: signal 0 reaches zombies too, so this errs long.
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # pid (comm) state ppid pgrp ...; comm may hold spaces or ')'.
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def launch(
    command,
    workers=2,
    rate=None,
    timeout=None,
    max_restarts=0,
    env=None,
    out=None,
    grace=5.0,
):
    """Run `command` as `workers` MultiWorkerMirroredStrategy workers.

    Returns 0 when all workers succeed; the first failing worker's exit code
    (128 + signal when it was killed) when one fails; 124 after `timeout`
    seconds (for all attempts together); 130 on Ctrl-C. When a worker fails,
    all workers are stopped and, up to `max_restarts` times, started again
    (with new ports), so that a script using
    `tfso.callbacks.BackupAndRestore` resumes from its last backup. Every
    worker gets `TF_CONFIG`, `TFSO_NUM_WORKERS` and `TFSO_RESTART` (0 for the
    first attempt) in its environment.
    """
    import math  # local: these checks are the only users
    import numbers

    if isinstance(command, (str, bytes)) or not command:
        raise ValueError(
            "`command` must be a non-empty list of the program and its "
            "arguments, e.g. ['python', 'train.py'] (shlex.split turns a "
            f"command line into one); received {command!r}"
        )
    command = list(command)
    if not all(isinstance(part, (str, bytes, os.PathLike)) for part in command):
        raise ValueError(
            f"`command` must be a list of strings or paths; received {command!r}"
        )

    def whole(value):
        return (
            not isinstance(value, bool)
            and isinstance(value, numbers.Real)
            and math.isfinite(value)
            and int(value) == value
        )

    if not whole(workers) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1; received {workers!r}")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, numbers.Real)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(
            f"`timeout` must be > 0 seconds and finite, or None; received {timeout!r}"
        )
    if not whole(max_restarts) or max_restarts < 0:
        raise ValueError(
            f"`max_restarts` must be an integer >= 0; received {max_restarts!r}"
        )
    out = out or sys.stdout
    lock = threading.Lock()
    deadline = None if timeout is None else time.monotonic() + timeout
    namespace = RateLimitedNamespace(rate) if rate else None
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        # Workers run in their own sessions; a SIGTERM to the launcher must
        # still stop them, so it unwinds like Ctrl-C.
        previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    if namespace is not None:
        namespace.__enter__()
    try:
        for attempt in range(int(max_restarts) + 1):
            if attempt:
                with lock:
                    out.write(f"[launch] restart {attempt} of {max_restarts}\n")
                    out.flush()
            code = _attempt(
                command,
                int(workers),
                namespace,
                env,
                out,
                lock,
                deadline,
                grace,
                attempt,
            )
            if code in (0, 124, 130):
                return code
        return code
    finally:
        if namespace is not None:
            namespace.__exit__()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _attempt(command, workers, namespace, env, out, lock, deadline, grace, attempt):
    processes, threads = [], []
    try:
        ports = free_ports(workers)
        for index in range(workers):
            worker_env = dict(os.environ if env is None else env)
            worker_env["TF_CONFIG"] = tf_config(ports, index)
            worker_env["TFSO_NUM_WORKERS"] = str(workers)
            worker_env["TFSO_RESTART"] = str(attempt)
            worker_env.setdefault("PYTHONUNBUFFERED", "1")
            cmd = namespace.wrap(command) if namespace else list(command)
            p = subprocess.Popen(
                cmd,
                env=worker_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            processes.append(p)
            t = threading.Thread(
                target=_stream,
                args=(p.stdout, f"[worker {index}] ", out, lock),
                daemon=True,
            )
            t.start()
            threads.append(t)
        return _wait(processes, deadline, grace, out, lock)
    except KeyboardInterrupt:
        return 130
    finally:
        _stop(processes, grace)
        for t in threads:
            t.join(timeout=2)


def _wait(processes, deadline, grace, out, lock):
    while True:
        codes = [p.poll() for p in processes]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            index, code = failed[0]
            with lock:
                out.write(f"[launch] worker {index} exited with {code}; stopping all\n")
                out.flush()
            _stop(processes, grace)
            # A worker killed by signal s reports -s; shells report 128 + s.
            return code if code > 0 else 128 - code
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            with lock:
                out.write("[launch] timeout; stopping all workers\n")
                out.flush()
            _stop(processes, grace)
            return 124
        time.sleep(0.1)
