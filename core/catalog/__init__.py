"""The catalogue: images and their files, imports, categories and labels with their audit trail, splits, duplicates,
deletion, exports. Never imports core.ml or models."""
