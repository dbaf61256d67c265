"""One training engine for embeddings and hypernetworks: dataset, LR schedule, loop, checkpoints, previews."""
