"""Argument checks shared by every public entry point.

Each check returns the value in canonical form or raises a ValueError that
names the argument and what it accepts, in one style:

    `block_size` must be an integer in [1, 1048576]; received 0

Checks run in constructors, before any variable or graph is created.
"""

import math
import numbers

# Sizes beyond this cannot be a block or matrix side (a float32 square of it
# would not fit in memory); larger values are typos such as 1e300.
MAX_SIZE = 1 << 20


def fail(name, accepted, value):
    raise ValueError(f"`{name}` must be {accepted}; received {value!r}")


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number(
    name, value, low=None, high=None, low_open=False, high_open=False, optional=False
):
    """A finite real number in the given interval (None: unbounded side)."""
    if value is None and optional:
        return None
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    accepted = f"a finite number in {interval}" + (" or None" if optional else "")
    if not _is_real(value) or not math.isfinite(value):
        fail(name, accepted, value)
    if low is not None and (value <= low if low_open else value < low):
        fail(name, accepted, value)
    if high is not None and (value >= high if high_open else value > high):
        fail(name, accepted, value)
    return float(value)


def integer(name, value, minimum, maximum=None, optional=False):
    """An int (bool excluded) in [minimum, maximum]."""
    if value is None and optional:
        return None
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    accepted = f"an integer {bounds}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, accepted, value)
    if value < minimum or (maximum is not None and value > maximum):
        fail(name, accepted, value)
    return int(value)


def size(name, value, optional=False):
    """A matrix side or block size: an integer in [1, MAX_SIZE]."""
    return integer(name, value, 1, MAX_SIZE, optional=optional)


def choice(name, value, accepted):
    """One of `accepted`, compared by type and value (so True is not 1)."""
    for option in accepted:
        if value is option or (type(value) is type(option) and value == option):
            return value
    fail(name, f"one of {list(accepted)}", value)


def boolean(name, value, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        fail(name, "True or False" + (" or None" if optional else ""), value)
    return value


def learning_rate(value):
    """A finite number >= 0, or a schedule / callable (checked by Keras)."""
    if _is_real(value) or isinstance(value, bool):
        return number("learning_rate", value, 0.0)
    if value is None:
        fail("learning_rate", "a finite number >= 0, a schedule or a callable", value)
    return value


def seed(name, value):
    """A non-negative integer seed."""
    return integer(name, value, 0, (1 << 63) - 1)


def sequence(name, value):
    """A list or tuple (not a string), as a list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        fail(name, "a list or tuple", value)
    return list(value)


def strings(name, value):
    """A list or tuple of non-empty strings, as a list."""
    items = sequence(name, value)
    if not all(isinstance(item, str) and item for item in items):
        fail(name, "a list of non-empty strings", value)
    return items
