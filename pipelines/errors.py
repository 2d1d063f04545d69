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
