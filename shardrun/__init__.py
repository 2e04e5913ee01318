"""shardrun: one job spec trains a PyTorch model across Ray workers with DeepSpeed ZeRO."""

__version__ = "0.1.0"
