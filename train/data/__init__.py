"""Data sources yielding Samples (key, image, caption, meta) and the collate that makes batches."""
from train.data.collate import CollateForTraining
from train.data.synthetic import SyntheticShapes

__all__ = ["CollateForTraining", "SyntheticShapes"]
