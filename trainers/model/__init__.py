"""The model half, Dassl-free: backbones, the classifier, prompt sources, adapters, the RAda head,
fine-tuning and test-time training pieces, precision, and the trainers' compositions."""
