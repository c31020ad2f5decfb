"""User-facing errors: each one becomes a one-line message and exit code 2 in the CLI."""


class LowbitError(Exception):
    """A problem with the user's input (paths, configs, checkpoints, options)."""
