"""The ``eval:`` config section: which verification sets a run evaluates, and how."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpface.schema import at_least, positive, rule


def _fars_ok(v) -> bool:
    return all(not isinstance(f, bool) and isinstance(f, (int, float)) and 0 < f <= 1 for f in v)


@dataclass
class EvalConfig:
    num_identities: int = at_least(100, 2)  # held-out synthetic identities (disjoint from training)
    num_pairs: int = rule(600, lambda v: v >= 2 and v % 2 == 0, "even and >= 2")
    folds: int = at_least(10, 2)
    flip: bool = True
    batch_size: int = positive(128)
    fars: list = rule(default_factory=lambda: [0.1, 0.01], check=_fars_ok, why="a list of numbers in (0, 1]")
    bin_sets: list = field(default_factory=list)  # insightface-format .bin files
    # strict: at most floor(FAR·N) impostors accepted (NaN below 1/N); nearest: insightface's
    # reporting, the ROC point with the FPR nearest the target (eval/verification.tar_at_far)
    tar_convention: str = rule("strict", lambda v: v in ("strict", "nearest"), "strict or nearest")

    def has_sets(self, data) -> bool:
        """The same answer on every rank (only rank 0 builds the sets): evaluation is a
        collective moment, all ranks must agree to enter it."""
        return data.backend == "synthetic" or bool(self.bin_sets)

    def build_sets(self, data) -> dict:
        """name → (images_a, images_b, issame, folds) for the run's ``data`` section;
        held-out synthetic identities start after the training identities, so they
        never overlap."""
        sets = {}
        if data.backend == "synthetic":
            from dpface.data.synthetic.pairs import make_verification_pairs

            s = data.synthetic
            p = make_verification_pairs(num_pairs=self.num_pairs, identity_offset=s.num_identities,
                                        num_identities=self.num_identities, seed=s.seed,
                                        image_size=data.image_size, difficulty=s.difficulty,
                                        num_folds=self.folds)
            sets["synthetic"] = (p.images_a, p.images_b, p.issame, p.fold)
        for path in self.bin_sets:
            from dpface.eval.bin_sets import load_bin

            a, b, same = load_bin(path, image_size=data.image_size)
            sets[Path(path).stem] = (a, b, same, None)
        return sets

    def run(self, backbone, sets: dict, device, rocs: dict | None = None) -> dict:
        """Scalar metrics per set; ``rocs``, when given, receives name → (fpr, tpr)."""
        from dpface.eval.verification import evaluate_pairs, tar_key

        metrics = {}
        for name, (a, b, same, folds) in sets.items():
            # num_folds: sets without fold ids (.bin) are split into eval.folds consecutive parts
            r = evaluate_pairs(backbone, a, b, same, folds=folds, batch_size=self.batch_size,
                               device=device, flip=self.flip, num_folds=self.folds,
                               fars=tuple(self.fars), tar_convention=self.tar_convention)
            if rocs is not None:
                rocs[name] = r.roc[:2]
            metrics[f"{name}/acc"] = r.accuracy
            metrics[f"{name}/acc_std"] = r.accuracy_std
            metrics[f"{name}/auc"] = r.auc
            for far, tar in r.tar_at_far.items():
                metrics[f"{name}/{tar_key(far, self.tar_convention)}"] = tar
        return metrics
