"""Worker side: topology, model, DeepSpeed engine, the loop, checkpoints."""
