"""memfilter.filtering: the method. Signal, filter policies and per-sample records.

Imports nothing of the project; takes diffusers modules, tensors and iterables.
"""
from memfilter.filtering.policies import (BatchQuantile, FilterPolicy, FixedThreshold, NoFilter, RunningQuantile,
                                TimestepBucketed, build_policy)
from memfilter.filtering.records import RecordWriter, read_records
from memfilter.filtering.signal import magnitude_from_predictions, text_noise_magnitude

__all__ = ["BatchQuantile", "FilterPolicy", "FixedThreshold", "NoFilter", "RunningQuantile", "TimestepBucketed",
           "build_policy", "RecordWriter", "read_records", "magnitude_from_predictions", "text_noise_magnitude"]
