"""The one base of every error qvlm reports to a user as a message (no traceback), and the exit code of each
category. Messages are one line per problem, naming the field or file and how to fix it.

Exit codes: 0 done, 1 the job failed, 2 invalid job file or input, 3 cluster unreachable, 4 storage error
(130 / 143 for SIGINT / SIGTERM are the command line's, not an error's).
"""

from __future__ import annotations

EXIT_CODES = {"failed": 1, "input": 2, "cluster": 3, "storage": 4}


class QvlmError(Exception):
    """Base of the project's errors; ``category`` decides the exit code."""

    category = "failed"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.category]


class InputError(QvlmError):
    """An input the job names (the job file, model, calibration data, output location) is missing or unusable."""

    category = "input"


class JobFailed(QvlmError):
    """The job ran and failed."""

    category = "failed"


class ClusterError(QvlmError):
    """The Ray cluster cannot be reached or refused the job."""

    category = "cluster"


class StorageError(QvlmError):
    """Reading or writing the model or output storage failed."""

    category = "storage"


def exit_code(exc: BaseException) -> int:
    """The exit code an error ends the command line with: its category's, 1 for anything else."""
    return exc.exit_code if isinstance(exc, QvlmError) else 1
