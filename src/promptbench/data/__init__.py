"""Data: datasets, few-shot splits, transforms, the feature cache, the data module."""
