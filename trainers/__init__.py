"""RAda and the CLIP baselines it builds on.

The modules at this level are the Dassl glue: `engine` (the trainer base class), the registered
trainers (`*_trainers.py`, all imported by `register`) and `config` (every config key with its
default; needs only yacs). Two packages hold everything that runs without Dassl: `trainers.model`
(backbones, the classifier, prompt sources, adapters, the head, fine-tuning and test-time pieces,
precision) and `trainers.runs` (checkpoints, results, processes under torchrun, random states,
schedules). Importing `trainers`, `trainers.model` or `trainers.runs` needs no Dassl.
"""
