"""Importing this module registers every trainer of the project in Dassl's TRAINER_REGISTRY."""

from . import (  # noqa: F401
    adapter_trainers,
    clip_trainers,
    cocoop_trainers,
    finetune_trainers,
    guided_prompt_trainers,
    ivlp_trainers,
    lora_trainers,
    maple_trainers,
    promptsrc_trainers,
    rada_trainers,
    ttt_trainers,
)
