"""The model lifecycle: pixel and feature caches, pretrained backbones, training, versions and promotion, prediction,
label checks. With core.jobs.queue, the only part of core that imports models."""
