"""Errors whose message is meant for the user: train.py prints them without a traceback."""


class UserFacingError(RuntimeError):
    """Bad input (weights, checkpoints, configuration); the message names the fix."""


class CheckpointError(UserFacingError):
    """A checkpoint that is missing, unreadable or made for another model."""
