"""User-facing errors: a message that names the input and the problem.

Entrypoints catch :class:`VitditError`, print its message and exit non-zero; anything else is a bug
and keeps its traceback.
"""


class VitditError(Exception):
    """Bad input or an unusable state that the user can fix (exit code 2)."""


class DatasetMismatchError(VitditError):
    """A latent data set made with another VAE, resolution or layout than the consumer expects."""


class UnsafeCheckpointError(VitditError):
    """A checkpoint file that would need pickled code to load."""
