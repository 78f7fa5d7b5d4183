"""Training: distributed set-up, optimiser, DeepSpeed engine, metrics, checkpoints and the pre-training loop."""
