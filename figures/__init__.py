"""Figures of the runs this project writes: what the RAda head learned (head.py), the results
beside the published methods (results.py) and the training curves (curves.py). Plain
matplotlib on its Agg canvas (no display needed); nothing here imports Dassl."""
