"""The errors a user can fix: a bad config, bad inputs, stages run out of order.

The CLI prints a ``UserError``'s message and exits with status 2; any other exception is a bug in
the pipeline, printed with its traceback (status 1). Each class also derives from the built-in
exception that callers of the library would expect (``ValueError``, ``FileNotFoundError``).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user asked for or gave; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration file, override or setting that does not fit the schema or the data."""


class InputError(UserError, ValueError):
    """Input data that cannot be used as given: a corpus, checkpoint or shard of the wrong kind."""


class MissingInputError(UserError, FileNotFoundError):
    """An input path or URL that does not exist or holds nothing usable."""


class BadInputError(InputError):
    """A corpus file that cannot be used, under ``data.on_bad_input: fail``."""


class ManifestError(UserError):
    """A stage manifest that is missing, incomplete or of another format version."""


class CapacityError(UserError, RuntimeError):
    """A cluster that cannot place the workers a stage asked for within the configured wait."""


class UnsupportedRayError(UserError, ImportError):
    """An installed Ray without a Ray Train internal that vqpipe needs (see pipelines.ray_compat)."""


class MemoryBudgetError(ConfigError):
    """A training stage whose estimated memory per worker exceeds its device's (pipelines.sizing)."""


def user_error_in(error: BaseException) -> UserError | None:
    """The ``UserError`` behind ``error``, when Ray wrapped it on its way to the driver.

    A ``BadInputError`` raised in a Ray Data task reaches the driver inside a ``RayTaskError``
    (whose message is Ray's traceback), and one raised in a Ray Train worker inside a training
    error: the user's mistake is still the cause, and the CLI reports it as one. Follows ``cause``
    (Ray's task errors), ``__cause__`` and ``__context__``, and returns the error as it was
    raised, not Ray's copy of it (a class Ray derives from both); None when there is none.
    """
    wrapped, seen, queue = None, set(), [error]
    while queue:
        current = queue.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            if not type(current).__module__.startswith("ray."):
                return current
            wrapped = wrapped or current
        queue.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return wrapped
