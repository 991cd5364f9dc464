"""Training: the config-driven trainer (accelerate), its methods, data stream, checkpoints and objective."""
