"""Every error kind of the package (each names the problem in its message), and the fit's exit codes."""

# python -m dime_lightning.fit exits with: bad input, non-finite values, no disk space, stopped by SIGTERM
# (checkpoint written; 128 + 15 as a shell reports a process SIGTERM killed)
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_NO_SPACE, EXIT_SIGTERM = 2, 3, 4, 143


class BadInputError(ValueError):
    """Input that cannot be used (a setting, env id, file, URI or option): the message names it and what is allowed.
    Every input error derives from it, and only these end a command with ``EXIT_BAD_INPUT`` (any other exception,
    a bug's ``TypeError`` included, is not reported as bad input)."""


class NonFiniteError(FloatingPointError):
    """A loss, observation or reward that is NaN or infinite; the message names it and the env step."""


class RunLockedError(BadInputError):
    """Another live process writes this run's checkpoint folder (``run_lock``); the message names it."""


class DamagedDumpError(BadInputError):
    """A replay-buffer dump whose files do not match the record written with it (``buffer_dump``)."""


class DiskSpaceError(OSError):
    """Not enough free space for a checkpoint or buffer dump; the message names the folder and the need."""


class CheckpointError(BadInputError):
    """A checkpoint that cannot be found, read or used with this config."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint refused because loading it could run code (never a fallback candidate: it was tampered)."""


class UnsafeCheckpointError(BadInputError):
    """A checkpoint or buffer dump whose loading would need types outside the allowlist (could run code)."""


class UnreadableCheckpointError(BadInputError):
    """A file that is not a readable ``torch.save`` archive (corrupt, truncated, another format)."""


class EnvIdError(BadInputError):
    """An env id that cannot be built, with a message saying which forms are accepted."""


class TrackingError(BadInputError):
    """The MLflow tracking URI cannot be used."""


class VideoError(BadInputError):
    """Evaluation videos cannot be made here (no renderer, no codec, or an env without a MuJoCo scene)."""


class CompareError(BadInputError):
    """An unknown experiment, metric, grouping key or reference task; the message lists what exists."""


class ReferenceDataError(BadInputError):
    """An unknown reference source, or an env id without a published reference; the message lists what exists."""


class ReproduceError(BadInputError):
    """A task, seed count or reference that cannot be run; the message names it and lists what exists."""


class SlurmError(BadInputError):
    """SLURM cannot take the jobs (programs missing, a bad option, a failed submission); the message says which."""


class FitFailed(RuntimeError):
    """The fit in a job exited with an error: the job ends FAILED and is not requeued."""


class LibraryChangedError(RuntimeError):
    """A private part of a library that dime_lightning relies on is gone or has changed."""
