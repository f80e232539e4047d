"""Evaluation: 1:1 verification (10-fold, TAR@FAR, ROC), 1:N identification (CMC, TPIR@FPIR,
distractors), IJB templates (``ijb``), .bin sets, plots."""
from .bin_sets import load_bin, write_bin
from .embeddings import extract_embeddings
from .identification import (
                             cmc,
                             identification_rates,
                             rank1_identification,
                             rank1_vs_distractors,
                             search,
                             template_embedding,
                             tpir_at_fpir,
)
from .plots import cmc_plot, det_plots, distractor_plot, roc_plot, roc_plots
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
    "cmc",
    "cmc_plot",
    "det_plots",
    "distractor_plot",
    "rank1_vs_distractors",
    "roc_plots",
    "search",
    "tpir_at_fpir",
]
