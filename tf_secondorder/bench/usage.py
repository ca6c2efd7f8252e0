"""The error every `tf-secondorder` argument check raises."""


class UsageError(ValueError):
    """An invalid command-line argument, found before any work starts.

    `cli.console` (the `tf-secondorder` command) prints it and exits with
    code 2; `cli.main` raises it, so callers see a ValueError naming the
    argument.
    """


def usage_error(name, expected, received):
    """UsageError("`name` must be expected; received received")."""
    return UsageError(f"`{name}` must be {expected}; received {received}")
