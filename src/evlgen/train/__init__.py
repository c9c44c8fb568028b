"""Training: the loop, optimizer and schedule, checkpoints with exact resume, distributed helpers, logging."""
