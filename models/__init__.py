"""prodcat's pure ML library: timm networks, preprocessing, training, checkpoints, inference and metrics."""
