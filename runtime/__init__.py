"""dlc's runtime: data, initializers, optimizer state, the training loop, checkpoints, the CLI."""
