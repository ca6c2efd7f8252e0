"""Counters of the private-API hooks, for tests that check Keras still calls them.

Off unless switched on, so production steps pay nothing and count nothing:
either `with count_hook_calls() as calls: ...` in-process, or the environment
variable `TFSO_COUNT_HOOK_CALLS=1` before import (worker processes).
Counts are taken when a hook is traced, not each time the graph runs.
"""

import collections
import contextlib
import os

_calls = collections.Counter() if os.environ.get("TFSO_COUNT_HOOK_CALLS") else None


def record(name):
    """Counts one traced call of the hook `name` when counting is on."""
    if _calls is not None:
        _calls[name] += 1


def hook_calls():
    """The counts so far (a copy), or {} when counting is off."""
    return dict(_calls or {})


@contextlib.contextmanager
def count_hook_calls():
    """Counts hook calls inside the block; yields a Counter filled as they happen."""
    global _calls
    previous = _calls
    _calls = collections.Counter()
    try:
        yield _calls
    finally:
        if previous is not None:
            previous.update(_calls)
        _calls = previous
