"""Errors that stop a run with a message naming the problem."""


class NonFiniteError(FloatingPointError):
    """A loss, observation or reward that is NaN or infinite; the message names it and the env step."""


class RunLockedError(ValueError):
    """Another live process writes this run's checkpoint folder (``run_lock``); the message names it."""


class DamagedDumpError(ValueError):
    """A replay-buffer dump whose files do not match the record written with it (``buffer_dump``)."""


class DiskSpaceError(OSError):
    """Not enough free space for a checkpoint or buffer dump; the message names the folder and the need."""
