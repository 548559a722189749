"""Training: schedules, optimizers, checkpoints and the loop."""
