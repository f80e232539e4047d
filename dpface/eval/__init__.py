"""Evaluation: 1:1 verification (10-fold, TAR@FAR, ROC), 1:N identification, .bin sets."""
from .bin_sets import load_bin, write_bin
from .embeddings import extract_embeddings
from .identification import identification_rates, rank1_identification, template_embedding
from .plots import roc_plot
from .verification import (
    VerificationResult,
    auc,
    best_threshold,
    evaluate_pairs,
    evaluate_scores,
    kfold_accuracy,
    pair_scores,
    roc_curve,
    tar_at_far,
)

__all__ = [
    "VerificationResult",
    "auc",
    "best_threshold",
    "evaluate_pairs",
    "evaluate_scores",
    "extract_embeddings",
    "identification_rates",
    "kfold_accuracy",
    "load_bin",
    "pair_scores",
    "rank1_identification",
    "roc_curve",
    "roc_plot",
    "tar_at_far",
    "template_embedding",
    "write_bin",
]
