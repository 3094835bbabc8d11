"""The detector contract: the registry, the scorer and detector bases, the training loop,
thresholds, predictions and the model file format."""
