"""The one exception family the CLI reports as a single line (no traceback).

Anything the user can fix (a config key, a data file, a checkpoint, a CLI argument) raises a
subclass of `UserError` whose message names what is wrong and what was expected.
"""


class UserError(ValueError):
    """A problem with the user's input, reported on one line."""


class CheckpointError(UserError):
    """A run directory or checkpoint that cannot be used as asked."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""
