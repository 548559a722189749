"""Evaluation: features and kNN."""
from .knn import extract_features, knn_classify, knn_evaluate

__all__ = ["extract_features", "knn_classify", "knn_evaluate"]
