"""RAda and the CLIP baselines it builds on.

The modules at this level are the Dassl glue: `engine` (the trainer base class), the
registered trainers (`*_trainers.py`, all imported by `register`) and `config` (every config
key with its default; needs only yacs). `trainers.core` holds everything that runs without
Dassl: the head, model loading, prompts, adapters, fine-tuning and test-time training pieces,
precision, schedules and the checkpoint format. Importing `trainers` or `trainers.core` needs
no Dassl.
"""
