"""RAda and the CLIP baselines it builds on.

Importing this package needs no Dassl; `trainers.dassl_trainers` holds the Dassl glue.
"""
