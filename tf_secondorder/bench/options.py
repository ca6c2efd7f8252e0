"""`tf-secondorder bench --option OPTIMIZER:KEY=VALUE`: one optimizer's
keyword arguments for a run, read and checked before any run starts.

OPTIMIZER is a name of `--optimizers` (e.g. `compams+topk#a`: those runs
only) or a part of one before "#" or "+" (e.g. `compams`: every compams
run); a run takes the options of its base name, then of its name without
"#LABEL", then of its full name. Labels let one optimizer run several times
with different options: `--optimizers adam,localsgd#8,localsgd#16 --option
localsgd#8:average_every=8 --option localsgd#16:average_every=16`. KEY must be an
argument the optimizer accepts (`accepted_keys`); VALUE is read as JSON
(`3`, `0.5`, `true`, `null`, `{"name": "qsgd", "bits": 4}`, ...), else as the
string itself. `--shampoo-option KEY=VALUE` is `--option shampoo:KEY=VALUE`.
"""

import contextlib
import difflib
import inspect
import json

from tf_secondorder.bench.usage import UsageError, usage_error


def parse_value(text):
    """An option's value from the command line: JSON (`3`, `0.5`, `true`,
    `null`, ...) or else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def constructor_arguments(cls):
    """Named arguments of every `__init__` that `cls(...)`'s keyword
    arguments reach, down to the first one without **kwargs."""
    names = set()
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        for p in parameters:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                names.add(p.name)
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break  # keywords are not passed on past this class
    return names


def accepted_keys(base):
    """Sorted keys `--option BASE:KEY=VALUE` accepts for the bench optimizer
    `base` (a name of `optimizers.optimizer_names()`): its class's arguments, the
    communication options and the bench's own keys for it."""
    from tf_secondorder.bench import optimizers

    names = constructor_arguments(optimizers.optimizer_class(base))
    names |= optimizers.communication_keys() | set(optimizers.BENCH_KEYS.get(base, {}))
    # The learning rate comes from --lrs; "self" and "name" are not options.
    return sorted(names - {"self", "learning_rate", "name"})


def shampoo_arguments():
    """Keys `--shampoo-option` accepts."""
    return accepted_keys("shampoo")


def scopes(name):
    """The `--option` targets that reach the runs of `name`, broadest first:
    "localsgd+int8#a" -> ["localsgd", "localsgd+int8", "localsgd+int8#a"]."""
    untagged = name.partition("#")[0]
    found = []
    for scope in (untagged.partition("+")[0], untagged, name):
        if scope not in found:
            found.append(scope)
    return found


def _split(entry, argument):
    """ "compams:beta_2=0.99" -> ("compams", "beta_2", "0.99")."""
    example = (
        "KEY=VALUE (e.g. precondition_frequency=50)"
        if argument == "shampoo_option"
        else "OPTIMIZER:KEY=VALUE (e.g. compams:compression_warmup_steps=0)"
    )
    target = "shampoo"
    pair = entry
    if argument == "option":
        target, colon, pair = entry.partition(":")
        target = target.strip()
        if not colon or not target:
            raise usage_error(argument, example, repr(entry))
    key, equals, value = pair.partition("=")
    key = key.strip()
    if not equals or not key:
        raise usage_error(argument, example, repr(entry))
    return target, key, value


def parse(option_entries, shampoo_entries, names):
    """({OPTIMIZER: {key: value}}, {OPTIMIZER: argument}) from the `--option`
    and `--shampoo-option` entries, for the optimizer names `names` (already
    checked), the second naming the argument each OPTIMIZER's options came
    from; raises UsageError naming the argument."""
    from tf_secondorder.bench import optimizers

    targets = {scope for name in names for scope in scopes(name)}
    parsed, sources = {}, {}
    entries = [("shampoo_option", e) for e in shampoo_entries or []]
    entries += [("option", e) for e in option_entries or []]
    for argument, entry in entries:
        target, key, value = _split(entry, argument)
        if target not in targets:
            if argument == "shampoo_option":
                received = f"{shampoo_entries} with optimizers={sorted(names)!r}"
                expected = "given only when `optimizers` includes shampoo"
            else:
                known = scopes(target)[0] in optimizers.optimizer_names()
                received = f"{entry!r}, whose optimizer {target!r} is " + (
                    "not in `optimizers`" if known else "unknown"
                )
                expected = f"OPTIMIZER:KEY=VALUE with OPTIMIZER one of {names}"
                if targets - set(names):
                    expected += f" or {sorted(targets - set(names))}"
            raise usage_error(argument, expected, received)
        accepted = accepted_keys(scopes(target)[0])
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if key == "learning_rate":
                hint += " (learning rates come from --lrs)"
            what = "tfso.Shampoo" if argument == "shampoo_option" else target
            raise usage_error(
                argument,
                f"KEY=VALUE with KEY an argument of {what}: {accepted}",
                f"{key!r}{hint}",
            )
        parsed.setdefault(target, {})[key] = parse_value(value)
        sources[target] = (
            argument if sources.get(target, argument) == argument else "option"
        )
    return parsed, sources


def for_run(name, parsed):
    """The options of the runs of optimizer `name`: those of each of its
    `scopes`, the narrower ones overriding."""
    options = {}
    for scope in scopes(name):
        options.update(parsed.get(scope, {}))
    return options


def check_optimizers(names, lrs, parsed, sources, strategy):
    """Builds every configuration's optimizer once, so that a bad option value
    fails here, before the first run, rather than when its run starts."""
    from tf_secondorder.bench import optimizers

    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        for name in names:
            options = for_run(name, parsed)
            for lr in lrs:
                try:
                    optimizers.make_optimizer(name, lr, options)
                except (ValueError, TypeError) as e:
                    given = {sources[t] for t in scopes(name) if t in sources}
                    # Name the argument the options came from, else `lrs`.
                    argument = "lrs" if not given else "option"
                    if len(given) == 1:
                        argument = given.pop()
                    raise UsageError(
                        f"`{argument}`: {name} at learning rate {lr:g} with "
                        f"{options} is rejected: {e}"
                    ) from None
