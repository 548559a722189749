"""Evaluation: features, kNN, linear probe, fine-tuning, and the API the CLI calls (:mod:`.api`)."""
from .features import extract_features
from .knn import knn_classify, knn_evaluate

__all__ = ["extract_features", "knn_classify", "knn_evaluate"]
