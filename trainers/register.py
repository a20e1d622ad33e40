"""Importing this module registers every trainer of the project in Dassl's TRAINER_REGISTRY."""

from . import adapter_trainers, clip_trainers, maple_trainers, rada  # noqa: F401
