"""plan(): per-rank bytes against hand arithmetic for a small case."""
import pytest

from dpface.heads import format_plan, plan


def test_small_case_by_hand():
    # 10 classes over 3 ranks → 4, 3, 3; the busiest rank holds 4. K = ceil(0.5·4) = 2.
    # Global batch 3·2 = 6. fp32 params (4 B), SGD momentum (1×).
    d = plan(classes=10, dim=4, world=3, batch=2, sample_rate=0.5, kernel="reference")
    assert (d["classes_per_rank"], d["sampled_per_rank"], d["global_batch"]) == (4, 2, 6)
    assert d["memory"] == {
        "weight_shard": 4 * 4 * 4,  # 64
        "optimizer_state": 64,
        "weight_grad": 64,
        "scored_weight": 2 * 4 * 4,  # the gathered rows: 32
        "logits": 6 * 2 * 4,  # 48
        "logit_workspace": 3 * 48,  # 144
        "gathered_embeddings": 2 * 6 * 4 * 4,  # 192
    }
    assert d["memory_total"] == 608
    assert d["communication"] == {
        "embedding_gather_fwd": 2 * 2 * 4 * 4,  # (W-1)·batch·D·4 = 64
        "embedding_grad_allreduce_bwd": 2 * 64,  # ring all-reduce: 2·(W-1)/W·B_g·D·4 = 128
        "label_gather": 2 * 2 * 8,  # 32
        "softmax_scalars": 2 * 2 * 2 * 5 * 4,  # 5 scalars/sample all-reduced: 160
        "input_check": 2 * 4 * 8,  # 64
    }
    assert d["communication_total"] == 448
    assert d["unsharded_head"] == 10 * 4 * 4 * 3  # W + grad + momentum = 480


def test_dtype_optimizer_and_full_rate():
    d = plan(10, 4, 3, 2, 1.0, param_dtype="bf16", optimizer="adamw", kernel="reference")
    assert d["sampled_per_rank"] == 4
    assert d["memory"]["weight_shard"] == 4 * 4 * 2
    assert d["memory"]["optimizer_state"] == 2 * 32
    assert d["memory"]["scored_weight"] == 4 * 4 * 4  # the fp32 upcast, no gathered rows
    assert plan(10, 4, 3, 2, 1.0, kernel="reference")["memory"]["scored_weight"] == 0  # no copy
    assert d["unsharded_head"] == 10 * 4 * 2 * 4


def test_issue_example_and_format():
    d = plan(2_000_000, 512, 64, 128, 0.1, kernel="reference")
    assert d["classes_per_rank"] == 31_250 and d["sampled_per_rank"] == 3_125
    assert d["memory"]["weight_shard"] == 31_250 * 512 * 4
    assert d["memory"]["logits"] == 8192 * 3125 * 4
    text = format_plan(d)
    assert "2,000,000 classes x 512, world 64" in text
    assert "61.04 MiB" in text  # W shard
    assert "97.66 MiB" in text  # logits [8192, 3125] fp32


def test_fused_kernel_keeps_at_most_the_budget():
    """Global batch 8192, K = 3125: 97.66 MiB of logits fit the 128 MiB default budget (kept whole);
    at 64 MiB only the budget is kept. Tile: 2^18 / 8192 = 32 -> the 64-column minimum."""
    d = plan(2_000_000, 512, 64, 128, 0.1)
    assert d["memory"]["logits"] == 8192 * 3125 * 4
    assert d["memory"]["logit_workspace"] == 8192 * 64 * 4
    assert d["memory"]["scored_weight"] == 64 * 512 * 4
    assert plan(2_000_000, 512, 64, 128, 0.1, logits_budget_mb=64)["memory"]["logits"] == 64 << 20
    ref = plan(2_000_000, 512, 64, 128, 0.1, kernel="reference")
    assert d["memory_total"] < ref["memory_total"] - 3 * ref["memory"]["logits"]
    assert "head kernel: fused (logits kept for backward up to 128 MiB" in format_plan(d)


@pytest.mark.parametrize("kwargs,match", [
    ({"world": 11}, "world size 11 exceeds"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"param_dtype": "int8"}, "param_dtype 'int8' unknown"),
    ({"optimizer": "lamb"}, "optimizer 'lamb' unknown"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"kernel": "triton"}, "kernel 'triton' unknown"),
])
def test_errors(kwargs, match):
    args = {"classes": 10, "dim": 4, "world": 2, "batch": 2, "sample_rate": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan(**args)


def test_subcenters_multiply_the_rows_by_hand():
    # The small case with K = 3 sub-centres: 4 classes → 12 rows; 2 sampled classes → 6 rows.
    d = plan(classes=10, dim=4, world=3, batch=2, sample_rate=0.5, kernel="reference", subcenters=3)
    assert (d["classes_per_rank"], d["rows_per_rank"], d["sampled_per_rank"]) == (4, 12, 6)
    assert d["memory"] == {
        "weight_shard": 12 * 4 * 4, "optimizer_state": 192, "weight_grad": 192,
        "scored_weight": 6 * 4 * 4, "logits": 6 * 6 * 4, "logit_workspace": 3 * 144,
        "gathered_embeddings": 2 * 6 * 4 * 4,  # the batch side does not change
    }
    assert d["unsharded_head"] == 10 * 3 * 4 * 4 * 3
    assert "12 rows: 3 sub-centres each" in format_plan(d)
    with pytest.raises(ValueError, match="reference head"):
        plan(classes=10, dim=4, world=3, batch=2, subcenters=3)  # the fused op has no sub-centres
    with pytest.raises(ValueError, match="subcenters must be an integer >= 1"):
        plan(classes=10, dim=4, world=3, batch=2, kernel="reference", subcenters=0)
