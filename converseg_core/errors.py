"""Exceptions raised by converseg_core. Each names the problem so a user can act on it."""


class ConverSegError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(ConverSegError, ValueError):
    """An image or query that the model cannot take (wrong dtype, shape, size, empty text...)."""


class CheckpointError(ConverSegError):
    """A checkpoint that is missing, corrupted, or made for another variant; the message names the file."""


class BackendUnavailableError(ConverSegError, RuntimeError):
    """A runtime backend whose library is not installed here (onnxruntime, TensorRT)."""
