"""The project's user-facing errors. Each carries the CLI exit code it maps to; messages are one line per
problem, naming the field or file and how to fix it."""

from __future__ import annotations


class QvlmError(Exception):
    """Base of every error the CLI prints as a message (no traceback) and turns into ``exit_code``."""

    exit_code: int = 1


class JobSpecError(QvlmError):
    """The job file or a ``--set`` override is invalid (lines read ``FILE:LINE: dotted.path: message``)."""

    exit_code = 2


class InputError(QvlmError):
    """An input the job names (model, calibration data) is missing or unusable."""

    exit_code = 2


class ClusterError(QvlmError):
    """The Ray cluster cannot be reached or refused the job."""

    exit_code = 3


class StorageError(QvlmError):
    """Reading or writing the model or output storage failed."""

    exit_code = 4


class JobFailed(QvlmError):
    """The job ran and failed."""

    exit_code = 1
