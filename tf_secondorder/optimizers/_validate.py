"""Argument checks that raise ValueError naming the argument and what is accepted."""

import numbers


def _fail(name, value, accepted):
    raise ValueError(f"`{name}` must be {accepted}. Received: {name}={value!r}")


def learning_rate(value):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not value >= 0:
            _fail(
                "learning_rate", value, "a non-negative float, a schedule or a callable"
            )
    return value


def in_range(name, value, low, high, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, value, "a number")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        upper = "inf)" if high is None else f"{high}{right}"
        _fail(name, value, f"in {left}{low}, {upper}")
    return float(value)


def integer(name, value, minimum, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if not (isinstance(value, float) and value.is_integer()):
            _fail(
                name,
                value,
                f"an integer >= {minimum}" + (" or None" if optional else ""),
            )
    if value < minimum:
        _fail(
            name, value, f"an integer >= {minimum}" + (" or None" if optional else "")
        )
    return int(value)


def choice(name, value, accepted):
    if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
        _fail(name, value, f"one of {list(accepted)}")
    return value


def boolean(name, value):
    if not isinstance(value, bool):
        _fail(name, value, "True or False")
    return value
