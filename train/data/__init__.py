"""Data sources yielding Samples (key, image, caption, meta) and the collate that makes batches."""
from memfilter.train.data.collate import CollateForTraining

__all__ = ["CollateForTraining"]
