"""User-facing errors: each message is one line that names the thing and the fix."""


class CMATHError(Exception):
    """Base class: the CLI prints these as a single `error: ...` line and exits 2."""


class DataError(CMATHError, ValueError):
    """A dataset file (or a file being imported) is missing, corrupt or inconsistent."""


class ConfigError(CMATHError, ValueError):
    """A training config is invalid or does not fit the data it names."""


class NonFiniteLossError(CMATHError, FloatingPointError):
    """The training loss became NaN or infinite."""
