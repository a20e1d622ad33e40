"""The run-keeping half, Dassl-free: checkpoints and their policy, results, processes under
torchrun, random states, the run-folder lock and learning-rate schedules."""
