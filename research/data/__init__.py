"""Datasets (tfds builders prepared without TensorFlow), tokenizers and input pipelines."""
