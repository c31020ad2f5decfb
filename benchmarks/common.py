"""Helpers the benchmark scripts share."""

from __future__ import annotations

import subprocess
import sys


def lowbit(*args) -> str:
    """`python -m lowbit ARGS` in a child process; its stdout, or RuntimeError with its stderr."""
    result = subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return result.stdout
