"""Errors that the command line turns into one line on stderr and exit code 1.

Every failure a user can fix (bad params, missing or corrupt artifact, wrong checkpoint) raises a
``FerdError`` whose message says what is wrong *and* what to do about it. Anything else is a bug
and keeps its traceback.
"""


class FerdError(Exception):
    """A user-fixable failure; the message is shown as is, on one line."""


class FerdWarning(UserWarning):
    """Something a user should know that does not stop the command (e.g. an artifact that loaded
    unverified). ``ferd`` never prints: it calls ``warnings.warn(..., FerdWarning)`` and the command
    line shows the message as one ``warning:`` line."""


class ConfigError(FerdError):
    """params.yaml (or a command-line override) is invalid."""


class ArtifactError(FerdError):
    """An artifact is missing, corrupt, truncated, or of the wrong kind/shape."""


class DataError(FerdError):
    """A dataset cannot be found or read."""


class SourceError(FerdError):
    """A teacher source (file, URL, RobustBench id) cannot be used."""


def is_unpickling_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``pickle.UnpicklingError`` (what torch's weights-only loader and
    torchvision's CIFAR reader raise on a damaged or non-tensor file), matched by class name so that
    ferd never imports pickle (tests/test_source_safety.py scans for it)."""
    return any(cls.__name__ == "UnpicklingError" for cls in type(exc).__mro__)
