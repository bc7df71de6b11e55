"""User-facing errors: each message is one line that names the thing and the fix."""

from __future__ import annotations

import difflib
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path


class CMATHError(Exception):
    """Base class: the CLI prints these as a single `error: ...` line and exits 2."""


class DataError(CMATHError, ValueError):
    """A dataset file (or a file being imported) is missing, corrupt or inconsistent."""


class ConfigError(CMATHError, ValueError):
    """A training config is invalid or does not fit the data it names."""


class NonFiniteLossError(CMATHError, FloatingPointError):
    """The training loss became NaN or infinite."""


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option `word` is most likely a typo of, if any is close enough."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """" (did you mean 'gamma1'?)" for a typo of one of the options, else ""."""
    match = closest(word, options)
    return f" (did you mean '{match}'?)" if match else ""


def command(script: str) -> str:
    """How a hint names one of this install's commands (`cmath-train`, `cmath-hpo`, ...) so that
    it runs as printed: bare when the shell finds this install's, else its path (`.venv/bin/cmath-train`
    from the checkout, as the README runs them).

    Args:
        script: the command's name.

    Returns:
        What to type.
    """
    beside = Path(sys.executable).parent / script
    if not beside.exists() or shutil.which(script) == str(beside):
        return script
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)
