"""Datasets (TFDS builders), per-example transforms and grain input pipelines."""
