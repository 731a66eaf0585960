"""The errors a command reports as one line (no traceback): the user's input or files are at
fault, not the code."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types the verbs turn into a one-line message."""
    # A function, not a constant: these types live in modules that import torch, and a verb
    # module must import without it (`oecl eval --help` stays torch-free). The verbs call it
    # in an `except` clause, so it runs only once something has failed.
    from oecl_train.checkpoint import CheckpointError
    from oecl_train.data import DataError
    from oecl_train.trainer import TrainingDiverged

    return (ValueError, DataError, CheckpointError, TrainingDiverged, FileNotFoundError)
