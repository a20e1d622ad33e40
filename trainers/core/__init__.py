"""The parts of RAda and its baselines that run without Dassl; `trainers.*_trainers` compose them."""
