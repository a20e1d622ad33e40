"""Errors a user can fix; each message names the problem and the fix.

`train.py` catches `DatasetError` and prints the message instead of a stack trace.
"""


class DatasetError(Exception):
    """Base class of every user-facing dataset problem."""


class DatasetLayoutError(DatasetError, FileNotFoundError):
    """A folder or file the dataset needs is not on disk.

    `missing_path` is the first missing path, in the order a user would create them
    (root, dataset folder, image folders, split files).
    """

    def __init__(self, message, missing_path):
        super().__init__(message)
        self.missing_path = missing_path


class DatasetFormatError(DatasetError, ValueError):
    """A file is there but does not hold what the CoOp layout says it holds."""


class DatasetConfigError(DatasetError, ValueError):
    """A dataset name or option that does not exist (e.g. SUBSAMPLE_CLASSES=half)."""
