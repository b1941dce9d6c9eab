"""Errors that stop a run with a message naming the problem, and the fit's exit codes for them."""

# python -m dime_lightning.fit exits with: bad input, non-finite values, no disk space, stopped by SIGTERM
# (checkpoint written; 128 + 15 as a shell reports a process SIGTERM killed)
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_NO_SPACE, EXIT_SIGTERM = 2, 3, 4, 143


class NonFiniteError(FloatingPointError):
    """A loss, observation or reward that is NaN or infinite; the message names it and the env step."""


class RunLockedError(ValueError):
    """Another live process writes this run's checkpoint folder (``run_lock``); the message names it."""


class DamagedDumpError(ValueError):
    """A replay-buffer dump whose files do not match the record written with it (``buffer_dump``)."""


class DiskSpaceError(OSError):
    """Not enough free space for a checkpoint or buffer dump; the message names the folder and the need."""
