"""Tests for minidiff.data.shapes: determinism, caption grammar, geometric truth of relations."""
import pytest
import torch

from minidiff.data import shapes as S


def test_item_is_deterministic_in_seed_and_index():
    a, b = S.ShapesDataset(50, seed=3), S.ShapesDataset(50, seed=3)
    backwards = [b[i] for i in reversed(range(50))][::-1]  # access order must not matter
    for i in range(50):
        img, cap, attrs = a[i]
        assert torch.equal(img, backwards[i][0]) and cap == backwards[i][1] and torch.equal(attrs, backwards[i][2])
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], S.ShapesDataset(50, seed=4)[0][0])


def test_item_shapes_dtype_range_and_bulk_path_agree():
    ds = S.ShapesDataset(40, size=32, seed=0)
    images, captions, attrs = ds.tensors(chunk=16)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.float32
    assert attrs.shape == (40, 7) and attrs.dtype == torch.int64 and len(captions) == 40
    assert images.min() >= -1 and images.max() <= 1
    for i in (0, 17, 39):
        img, cap, a = ds[i]
        assert torch.allclose(img, images[i], atol=1e-6) and cap == captions[i] and torch.equal(a, attrs[i])
    bulk = S.make_shapes(40, 32, 0)
    assert torch.equal(bulk[0], images) and bulk[1] == captions


def test_64x64_and_one_object_mode():
    images, captions, attrs = S.make_shapes(20, 64, seed=1, max_objects=1)
    assert images.shape == (20, 3, 64, 64)
    assert (attrs[:, 3:] == -1).all() and all(" of " not in c and len(c.split()) == 4 for c in captions)


def test_both_object_counts_and_all_vocabulary_appear():
    _, captions, attrs = S.make_shapes(300, 16, seed=0)
    assert 0.35 < (attrs[:, 3] >= 0).float().mean() < 0.65
    for column, vocab in ((0, S.SHAPES), (1, S.COLORS), (2, S.SIZES), (6, S.RELATIONS)):
        assert set(attrs[:, column].tolist()) >= set(range(len(vocab)))
    assert set(" ".join(captions).split()) == set(S.WORDS)


def test_caption_parse_round_trip():
    _, captions, attrs = S.make_shapes(300, 16, seed=5)
    for text, a in zip(captions, attrs):
        assert torch.equal(S.parse_caption(text), a)
        assert S.caption(a) == text
    assert S.caption(S.parse_caption("  A Small RED circle ")) == "a small red circle"
    assert S.caption([1, 2, 1, 2, 3, 0, 2]) == "a large blue square left of a small yellow triangle"


@pytest.mark.parametrize("text, word", [
    ("a small pink circle", "'pink'"),
    ("a small red", "'<end of caption>'"),
    ("a small red circle near a small blue square", "'near'"),
    ("a small red circle left a small blue square", "'a'"),
    ("a small red circle above a small blue square please", "'please'"),
    ("the small red circle", "'the'"),
])
def test_parse_caption_names_the_offending_word(text, word):
    with pytest.raises(ValueError, match=word):
        S.parse_caption(text)


def test_bad_attrs_and_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"attrs\[1\] \(color1\) must be in 0..5, got 9"):
        S.caption([0, 9, 0, -1, -1, -1, -1])
    with pytest.raises(ValueError, match="shape2 = -1"):
        S.caption([0, 0, 0, -1, 2, 0, 1])
    with pytest.raises(ValueError, match="size must be an int >= 16.*got 8"):
        S.ShapesDataset(4, size=8)
    with pytest.raises(ValueError, match="max_objects must be 1 or 2, got 3"):
        S.ShapesDataset(4, max_objects=3)


def _object_mask(image, color_id):
    """Pixels that are clearly the given palette colour (anti-aliased edges excluded)."""
    rgb = image * 0.5 + 0.5  # (3, H, W) in [0, 1]
    return (rgb - S.COLOR_RGB[color_id].view(3, 1, 1)).abs().amax(0) < 0.05


def test_relations_are_true_in_the_pixels():
    """For two objects of different colours, the first is entirely above/below/left/right of the second."""
    ds = S.ShapesDataset(400, size=32, seed=2)
    checked = 0
    for i in range(len(ds)):
        attrs, centres = ds.layout(i)
        if attrs[3] < 0 or attrs[1] == attrs[4]:
            continue
        image = ds[i][0]
        m1, m2 = _object_mask(image, attrs[1]), _object_mask(image, attrs[4])
        assert m1.any() and m2.any(), ds[i][1]
        rows1, cols1 = m1.nonzero().T
        rows2, cols2 = m2.nonzero().T
        relation = S.RELATIONS[attrs[6]]
        ok = {"above": rows1.max() < rows2.min(), "below": rows1.min() > rows2.max(),
              "left of": cols1.max() < cols2.min(), "right of": cols1.min() > cols2.max()}[relation]
        assert ok, f"item {i}: {ds[i][1]!r} is not what the image shows"
        (x1, y1), (x2, y2) = centres.tolist()
        assert {"above": y1 < y2, "below": y1 > y2, "left of": x1 < x2, "right of": x1 > x2}[relation]
        checked += 1
    assert checked > 100


def test_objects_stay_inside_the_image_and_have_the_right_colour():
    ds = S.ShapesDataset(100, size=64, seed=7, max_objects=1)
    for i in range(len(ds)):
        image, _, attrs = ds[i]
        mask = _object_mask(image, attrs[1])
        assert mask.sum() > 20
        border = torch.cat([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert not border.any()


def test_large_is_larger_than_small_for_every_shape():
    for s in range(len(S.SHAPES)):
        areas = []
        for size_id in range(len(S.SIZES)):
            image = S.render([s, 5, size_id, -1, -1, -1, -1], 64, generator=torch.Generator().manual_seed(0))
            areas.append(float((image[0] * 0.5 + 0.5 - S.BACKGROUND_RGB[0]).sum()))
        assert areas[1] > 2 * areas[0], S.SHAPES[s]


def test_render_a_requested_caption():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = S.render("a large green cross right of a small purple triangle", 32, generator=g1)
    b = S.render(S.parse_caption("a large green cross right of a small purple triangle"), 32, generator=g2)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert _object_mask(a, S.COLORS.index("green")).any() and _object_mask(a, S.COLORS.index("purple")).any()
    c = S.render("a large green cross right of a small purple triangle", 32, generator=g1)
    assert not torch.equal(a, c)  # positions are jittered by the generator


def test_two_object_weights_give_the_asked_share_uniformly_within_groups():
    caps = ["a small red circle"] * 30 + ["a small red circle above a large blue square"] * 10
    w = S.two_object_weights(caps, 0.75)
    assert w.dtype == torch.float64 and torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(w[30:], torch.full((10,), 0.075, dtype=torch.float64))
    assert torch.allclose(w[:30], torch.full((30,), 0.25 / 30, dtype=torch.float64))
    for share in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="share must be in \\(0, 1\\)"):
            S.two_object_weights(caps, share)
    with pytest.raises(ValueError, match="needs both one- and two-object captions, got only one-object"):
        S.two_object_weights(caps[:30], 0.5)
    with pytest.raises(ValueError, match="word 5 should be a relation"):
        S.two_object_weights(["a small red circle near a large blue square"], 0.5)
