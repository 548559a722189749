"""Data: datasets, batched augmentations, CIFAR download."""
from .augment import TwoViewAugment, eval_transform
from .cifar import DataError
from .datasets import ImageData, TrainBatches, load_dataset

__all__ = ["TwoViewAugment", "eval_transform", "DataError", "ImageData", "TrainBatches", "load_dataset"]
