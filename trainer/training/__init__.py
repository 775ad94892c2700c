"""A training run: configuration, dataset and augmentations, weights, the epoch loop, checkpoints, DDP."""
