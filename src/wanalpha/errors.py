"""Errors the CLI turns into one line and an exit code (DESIGN §7.12: say what is wrong and how to fix it)."""


class WanAlphaError(Exception):
    """A user-facing failure: bad input, missing file, nothing to do. Exit code 1."""

    exit_code = 1


class ConfigError(WanAlphaError):
    """A bad run config or flag value. Exit code 2, like a usage error."""

    exit_code = 2
