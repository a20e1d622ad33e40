"""Importing this module registers every trainer of the project in Dassl's TRAINER_REGISTRY."""

from . import clip_trainers, rada  # noqa: F401
