"""1:1 verification: cosine scores, the LFW 10-fold protocol, TAR@FAR, ROC and AUC.

One decision rule everywhere in this module: a pair is accepted as "same" when
``score > threshold`` (strictly greater). A threshold of ``-inf`` accepts every pair and
``+inf`` rejects every pair; both are legitimate outcomes of threshold selection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .embeddings import extract_embeddings

DEFAULT_FARS = (1e-1, 1e-2, 1e-3)


@dataclass
class VerificationResult:
    """Outcome of a verification run; ``as_dict()`` is the JSON-loggable part."""

    accuracy: float  # mean of the per-fold held-out accuracies
    accuracy_std: float  # population std (ddof=0) over folds, as the insightface tables report
    fold_accuracies: list[float]
    thresholds: list[float]  # threshold used on test fold k, chosen on the other folds
    tar_at_far: dict[float, float]  # NaN where there are too few negatives to resolve that FAR
    auc: float
    roc: tuple[np.ndarray, np.ndarray, np.ndarray] = field(repr=False)  # (fpr, tpr, thresholds)
    tar_convention: str = "strict"  # how tar_at_far was read (``tar_at_far``)

    def as_dict(self) -> dict:
        """Plain JSON-safe values, without the ROC arrays.

        Non-finite numbers (an infinite threshold, an unresolvable TAR) become ``None`` because
        strict JSON has no NaN/Infinity; TAR keys become strings such as ``"tar@far=0.001"``
        (``"nearest_tar@far=0.001"`` under the nearest convention: ``tar_key``).
        """

        def clean(x: float):
            x = float(x)
            return x if math.isfinite(x) else None

        out = {
            "accuracy": clean(self.accuracy),
            "accuracy_std": clean(self.accuracy_std),
            "fold_accuracies": [clean(a) for a in self.fold_accuracies],
            "thresholds": [clean(t) for t in self.thresholds],
            "auc": clean(self.auc),
        }
        for far, tar in self.tar_at_far.items():
            out[tar_key(far, self.tar_convention)] = clean(tar)
        return out


# ----------------------------------------------------------------------------- validation


def _as_numpy_2d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x


def _check_scores_labels(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(issame)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(
            f"scores and issame must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores but {y.shape[0]} issame labels")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("issame must be boolean (or 0/1)")
        y = y.astype(bool)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN (an embedding was NaN or a zero vector?)")
    return s, y


# ----------------------------------------------------------------------------- scores


def pair_scores(emb_a, emb_b) -> np.ndarray:
    """Cosine similarity of row i of ``emb_a`` with row i of ``emb_b`` → float64 [P].

    Rows are L2-normalised here, so un-normalised embeddings are fine; a zero row gets score 0.
    """
    a = _as_numpy_2d(emb_a, "emb_a")
    b = _as_numpy_2d(emb_b, "emb_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding sizes differ: emb_a has D={a.shape[1]}, emb_b has D={b.shape[1]}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"pair counts differ: emb_a has {a.shape[0]} rows, emb_b has {b.shape[0]}")
    eps = 1e-12
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
    return np.einsum("ij,ij->i", a, b)


# ----------------------------------------------------------------------------- k-fold


def _candidate_thresholds(train_scores: np.ndarray) -> np.ndarray:
    """Every distinct decision on the training scores, each placed at its widest margin.

    Under ``score > t`` the training predictions only change when t crosses a training score,
    so the midpoints between consecutive unique scores, plus ``-inf`` (accept all) and ``+inf``
    (reject all), enumerate every achievable training accuracy exactly — no grid resolution to
    tune — and the midpoint is the max-margin choice inside each interval.
    """
    u = np.unique(train_scores)  # sorted ascending
    mids = u[:-1] + (u[1:] - u[:-1]) / 2.0
    # Between two adjacent floats the midpoint rounds onto one of them; rounded onto the
    # upper score, ``score > mid`` would reject it and the split would never be tried. The
    # lower score itself separates them (``score > lower`` accepts exactly the upper side).
    mids = np.where(mids < u[1:], mids, u[:-1])
    return np.concatenate(([-np.inf], mids, [np.inf]))


def best_threshold(scores, issame) -> tuple[float, float]:
    """Threshold maximising accuracy of ``score > t`` on (scores, issame) → (threshold, accuracy).

    Ties in accuracy resolve to the **highest** cosine threshold, as insightface does, so its
    published 10-fold numbers reproduce: its ``calculate_roc`` searches an ascending grid of
    squared-distance thresholds d (accept when ``dist < d``, dist = 2 − 2·cos for unit
    embeddings) and ``np.argmax`` returns the first best d, i.e. the smallest distance, i.e.
    the largest cosine threshold 1 − d/2 among the tied ones. Here the candidates are the
    exact decision intervals (see ``_candidate_thresholds``) instead of a 0.01 grid, so the
    chosen interval is insightface's whenever its grid reaches it; inside it the threshold
    is the midpoint (insightface's grid point lies somewhere in the same interval).
    """
    s, y = _check_scores_labels(scores, issame)
    if s.size == 0:
        raise ValueError("cannot choose a threshold from zero pairs")
    cand = _candidate_thresholds(s)
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    # positives accepted: score > t;  negatives rejected: score <= t
    tp = pos.size - np.searchsorted(pos, cand, side="right")
    tn = np.searchsorted(neg, cand, side="right")
    acc = (tp + tn) / s.size
    k = acc.size - 1 - int(np.argmax(acc[::-1]))  # the last (highest) of the tied maxima
    return float(cand[k]), float(acc[k])


def _accuracy_at(s: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(np.mean((s > t) == y))


def kfold_accuracy(scores, issame, folds: np.ndarray | None = None, num_folds: int = 10):
    """LFW protocol: for each fold, choose the threshold on the other folds, score the fold.

    ``folds``: optional int array [P] giving each pair's fold id (e.g. the official LFW split);
    if None the pairs are split consecutively into ``num_folds`` parts (``np.array_split``:
    equal when P is divisible, as for LFW's 6000 pairs; otherwise the first parts get one
    extra pair, as sklearn's unshuffled KFold does).

    Returns ``(fold_accuracies, thresholds)``, both lists in fold order (sorted fold ids).
    """
    s, y = _check_scores_labels(scores, issame)
    n = s.size
    if folds is None:
        if not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
            raise ValueError(f"num_folds must be an int >= 2, got {num_folds!r}")
        if n < num_folds:
            raise ValueError(f"{n} pairs cannot be split into {num_folds} folds")
        fold_ids = np.repeat(np.arange(num_folds),
                             [len(c) for c in np.array_split(np.arange(n), num_folds)])
    else:
        fold_ids = np.asarray(folds)
        if fold_ids.shape != (n,):
            raise ValueError(f"folds must have shape ({n},) like scores, got {fold_ids.shape}")
        if not np.issubdtype(fold_ids.dtype, np.integer):
            raise ValueError(f"folds must be integer fold ids, got dtype {fold_ids.dtype}")
        if np.unique(fold_ids).size < 2:
            raise ValueError("folds must contain at least 2 distinct fold ids")

    accs: list[float] = []
    thresholds: list[float] = []
    for f in np.unique(fold_ids):
        test = fold_ids == f
        t, _ = best_threshold(s[~test], y[~test])
        thresholds.append(t)
        accs.append(_accuracy_at(s[test], y[test], t))
    return accs, thresholds


# ----------------------------------------------------------------------------- TAR@FAR, ROC


TAR_CONVENTIONS = ("strict", "nearest")


def tar_key(far: float, convention: str = "strict") -> str:
    """The metric name of a TAR at ``far``: ``tar@far=0.01`` (strict) or ``nearest_tar@far=0.01``,
    so every table says which convention produced it."""
    return f"{'nearest_' if convention == 'nearest' else ''}tar@far={far:g}"


def tar_at_far(scores, issame, fars=DEFAULT_FARS, convention: str = "strict") -> dict[float, float]:
    """True-accept rate at a fixed false-accept rate, for each target FAR.

    ``strict`` (accept when ``score > t``): with N negative pairs, at most ``k = floor(FAR·N)``
    negatives may be accepted. The threshold is the smallest t with #{neg > t} <= k, which is
    exactly the (k+1)-th largest negative score; TAR = #{pos > t} / #positives.
    Ties: negatives tied at t are rejected (so the achieved FAR may fall below the target when
    several negatives share that score), and positives tied at t are rejected too.
    If k < 1 — fewer than 1/FAR negatives — the FAR cannot be resolved and the result is NaN,
    as it is when there are no positive pairs.

    ``nearest`` is how insightface's IJB script reports (for comparison with published tables):
    the TPR of the ROC point whose FPR is nearest the target (the first such point, thresholds
    descending), on the ROC with collinear intermediate points dropped (scikit-learn's
    ``roc_curve`` default, which that script uses). It can read higher than ``strict`` (the
    nearest point may lie above the target FAR) and reports a value below 1/N negatives.
    """
    s, y = _check_scores_labels(scores, issame)
    if convention not in TAR_CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(TAR_CONVENTIONS)}, got {convention!r}")
    neg_desc = np.sort(s[~y])[::-1]
    pos = s[y]
    roc = _nearest_roc(s, y) if convention == "nearest" and pos.size and neg_desc.size else None
    out: dict[float, float] = {}
    for far in fars:
        far = float(far)
        if not 0.0 < far <= 1.0:
            raise ValueError(f"FAR must be in (0, 1], got {far}")
        if convention == "nearest":
            out[far] = float("nan") if roc is None else float(roc[1][int(np.argmin(np.abs(roc[0] - far)))])
            continue
        # small slack so that e.g. 1e-3 * 1000 counts as 1 despite float rounding
        k = int(math.floor(far * neg_desc.size + 1e-9))
        if k < 1 or pos.size == 0:
            out[far] = float("nan")
            continue
        t = neg_desc[k] if k < neg_desc.size else -np.inf
        out[far] = float(np.mean(pos > t))
    return out


def _nearest_roc(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC as insightface's reporting sees it: one point per distinct score
    (descending) after the origin, minus the points in the middle of a straight run (where
    both cumulative counts have zero second difference; the first and last are kept)."""
    fpr, tpr, _ = roc_curve(s, y)
    f, t = fpr[1:], tpr[1:]
    if f.size > 2:
        keep = np.r_[True, (np.diff(f, 2) != 0) | (np.diff(t, 2) != 0), True]
        f, t = f[keep], t[keep]
    return np.r_[0.0, f], np.r_[0.0, t]


def roc_curve(scores, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC as (fpr, tpr, thresholds), thresholds descending, accept when ``score > threshold``.

    The first point is (0, 0) at the largest score (nothing is strictly above it), then one
    point per further distinct score, ending at (1, 1) with threshold ``-inf``. Tied scores
    form a single step, so the trapezoid area counts ties as half, like Mann–Whitney.
    """
    s, y = _check_scores_labels(scores, issame)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"ROC needs both classes, got {n_pos} positive and {n_neg} negative pairs")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # last index of each run of equal scores = counts accepted once t drops below that score
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tpr = np.r_[0.0, tp[last] / n_pos]
    fpr = np.r_[0.0, fp[last] / n_neg]
    # threshold at step i accepts scores strictly above it: the next distinct score down
    uniq_desc = s_sorted[last]
    thr = np.r_[uniq_desc, -np.inf]
    return fpr, tpr, thr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve by the trapezoid rule (fpr must be non-decreasing)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1:
        raise ValueError(f"fpr and tpr must be 1-D of equal length, got {fpr.shape}, {tpr.shape}")
    if np.any(np.diff(fpr) < 0):
        raise ValueError("fpr must be non-decreasing")
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


# ----------------------------------------------------------------------------- drivers


def evaluate_scores(scores, issame, folds=None, num_folds: int = 10,
                    fars=DEFAULT_FARS, tar_convention: str = "strict") -> VerificationResult:
    """All verification metrics from precomputed pair scores."""
    s, y = _check_scores_labels(scores, issame)
    accs, thresholds = kfold_accuracy(s, y, folds=folds, num_folds=num_folds)
    fpr, tpr, thr = roc_curve(s, y)
    return VerificationResult(
        accuracy=float(np.mean(accs)),
        accuracy_std=float(np.std(accs)),
        fold_accuracies=accs,
        thresholds=thresholds,
        tar_at_far=tar_at_far(s, y, fars, tar_convention),
        auc=auc(fpr, tpr),
        roc=(fpr, tpr, thr),
        tar_convention=tar_convention,
    )


def evaluate_pairs(model, images_a, images_b, issame, folds=None, batch_size: int = 128,
                   device="cpu", flip: bool = True, num_folds: int = 10,
                   fars=DEFAULT_FARS, tar_convention: str = "strict") -> VerificationResult:
    """Embed both sides of every pair with ``model`` and run the verification protocol.

    ``images_a[i]``/``images_b[i]`` form pair i; images are uint8 (see ``extract_embeddings``).
    """
    if len(images_a) != len(images_b):
        raise ValueError(f"images_a has {len(images_a)} images but images_b has {len(images_b)}")
    if len(images_a) != len(issame):
        raise ValueError(f"{len(images_a)} image pairs but {len(issame)} issame labels")
    emb_a = extract_embeddings(model, images_a, batch_size=batch_size, device=device, flip=flip)
    emb_b = extract_embeddings(model, images_b, batch_size=batch_size, device=device, flip=flip)
    if emb_a.shape[1] != emb_b.shape[1]:
        raise ValueError(
            f"embedding sizes differ: side a gave D={emb_a.shape[1]}, side b D={emb_b.shape[1]}")
    scores = pair_scores(emb_a, emb_b)
    return evaluate_scores(scores, issame, folds=folds, num_folds=num_folds, fars=fars,
                           tar_convention=tar_convention)
