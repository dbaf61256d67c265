"""Model management: checkpoints on disk, hashes, the default model, and the loaded pipeline."""
