"""The augmentation table's numpy forms against per-pixel references, and one name check
for both shard streams."""
import numpy as np
import pytest

from dpface.data.augment import AUGMENTS, N_DRAWS, apply_numpy, check_augment


@pytest.fixture
def img():
    return np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)


def draws(**at):
    u = np.full(N_DRAWS, 0.9)
    for name, values in at.items():
        u[list(AUGMENTS[name].draws)] = values
    return u


def test_flip_mirrors_below_one_half(img):
    assert np.array_equal(apply_numpy(img, draws(flip=0.3), ("flip",)), img[:, ::-1])
    assert np.array_equal(apply_numpy(img, draws(flip=0.7), ("flip",)), img)


@pytest.mark.parametrize("ux,uy", [(0.0, 0.0), (0.99, 0.2), (0.5, 0.999)])
def test_crop_is_an_edge_clamped_shift(img, ux, uy):
    h, w = img.shape[:2]
    p = h // 28
    x, y = int(ux * (2 * p + 1)), int(uy * (2 * p + 1))
    rows = np.clip(np.arange(h) + y - p, 0, h - 1)
    cols = np.clip(np.arange(w) + x - p, 0, w - 1)
    want = img[rows][:, cols]  # out[i, j] = img[clamp(i + y − p), clamp(j + x − p)]
    got = apply_numpy(img, draws(crop=(ux, uy)), ("crop",))
    assert got.shape == img.shape and np.array_equal(got, want)


def test_color_is_brightness_and_contrast_about_the_mean(img):
    got = apply_numpy(img, draws(color=(0.25, 1.0)), ("color",))
    b, c = 0.9, 1.2
    mean = img.astype(np.float64).mean()
    want = np.clip((img - mean) * c + mean * b, 0, 255)
    assert np.abs(got.astype(np.float64) - want).max() <= 1.0  # float32 and truncation


def test_only_the_named_augmentations_run_in_table_order(img):
    u = draws(flip=0.1, crop=(0.0, 1.0), color=(0.0, 0.5))
    assert np.array_equal(apply_numpy(img, u, ()), img)
    want = img
    for name in AUGMENTS:  # listed in any order, applied in the table's
        want = apply_numpy(want, u, (name,))
    assert np.array_equal(apply_numpy(img, u, ("flip", "color", "crop")), want)


def test_unknown_names_are_refused_by_both_streams(tmp_path):
    assert check_augment(["flip"]) == ("flip",) and check_augment(None) == ()
    with pytest.raises(ValueError, match=r"unknown augmentation 'flipp' \(did you mean 'flip'\?\)"):
        check_augment(("flipp",))
    pytest.importorskip("nvidia.dali")
    from dpface.data.streams.dali import DaliStream
    with pytest.raises(ValueError, match="unknown augmentation 'colour'"):
        DaliStream(str(tmp_path / "none.tar"), batch_size=2, device="cpu", num_classes=2,
                   augment=("colour",))
