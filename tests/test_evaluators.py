"""The shipped evaluator networks: recorded accuracies hold, files load safely, shapes targets are canonical."""
import json
import math
import shutil

import pytest
import torch

from minidiff.eval import classifier_training as evaluator_training
from minidiff.eval import classifiers as E
from minidiff.eval import metrics


def _card(name):
    return json.loads((E.WEIGHTS_DIR / f"classifier-{name}.json").read_text())


def _within_noise(measured, recorded, n, n_card):
    """|measured - recorded| within 3 standard errors of the difference of two binomial proportions (+ 0.5 pt)."""
    se = math.sqrt(recorded * (1 - recorded) * (1 / n + 1 / n_card))
    return abs(measured - recorded) <= 3 * se + 0.005


def test_fashion_classifier_matches_its_card_on_the_test_set():
    model, card = E.load_classifier("fashion-mnist"), _card("fashion-mnist")
    images, targets = E.training_data("fashion-mnist", "test")
    images, targets = images[-2000:], targets[-2000:]
    acc = E.head_accuracy(model, images, targets)["label"]
    recorded = card["test_accuracy"]["label"]
    assert recorded >= 0.90
    assert _within_noise(acc, recorded, 2000, card["n_test"]), (acc, recorded)
    assert metrics.class_accuracy(model, images, targets[:, 0]) == pytest.approx(acc)


def test_shapes_classifier_matches_its_card_on_fresh_samples():
    model, card = E.load_classifier("shapes"), _card("shapes")
    images, targets = E.training_data("shapes", "test", n=1500, seed=12345)  # a seed used by neither split
    acc = E.head_accuracy(model, images, targets)
    for head, recorded in card["test_accuracy"].items():
        assert _within_noise(acc[head], recorded, 1500, card["n_test"]), (head, acc[head], recorded)


def test_prompt_adherence_is_high_for_true_prompts_and_low_for_shuffled_ones():
    from minidiff.data.shapes import make_shapes
    model = E.load_classifier("shapes")
    images, _, attrs = make_shapes(400, seed=777)
    true = metrics.prompt_adherence(model, images, attrs)
    shuffled = metrics.prompt_adherence(model, images, attrs[torch.randperm(400, generator=torch.Generator().manual_seed(0))])
    assert true["all"] == pytest.approx(E.head_accuracy(model, images, E.attrs_to_targets(attrs, model.config.heads))["all"])
    assert true["all"] > 0.7 and shuffled["all"] < 0.1
    assert set(true) == {"all", *model.config.heads}


@pytest.mark.parametrize("name", ["fashion-mnist", "shapes"])
def test_shipped_classifiers_are_small_and_expose_features(name):
    model, card = E.load_classifier(name), _card(name)
    path = E.WEIGHTS_DIR / f"classifier-{name}.safetensors"
    assert path.stat().st_size == card["file_bytes"] < 1_000_000
    c = model.config
    x = torch.zeros(2, c.in_channels, c.image_size, c.image_size)
    assert model.features(x).shape == (2, c.feature_dim) and 64 <= c.feature_dim <= 128
    with pytest.raises(ValueError, match="x must be"):
        model.features(torch.zeros(2, 5, 8, 8))
    images, _ = E.training_data(name, "test", n=500, seed=1)
    rms = E.extract_features(model, images).pow(2).mean().sqrt()
    assert 0.8 < rms < 1.25  # calibrated to unit RMS on training data, so KID's cubic kernel stays tame


def test_missing_corrupted_renamed_and_tampered_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped:.*fashion-mnist"):
        E.load_classifier("no-such-dataset")
    src = E.WEIGHTS_DIR / "classifier-fashion-mnist.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        E.load_classifier(truncated)
    renamed = tmp_path / "classifier-fashion-mnist.safetensors"
    shutil.copy(E.WEIGHTS_DIR / "classifier-shapes.safetensors", renamed)
    with pytest.raises(ValueError, match="holds a classifier for dataset 'shapes'.*renamed"):
        E.load_classifier(renamed)
    tampered = tmp_path / "tampered" / "classifier-fashion-mnist.safetensors"
    tampered.parent.mkdir()
    data = bytearray(src.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte inside the tensor data: only the card's SHA-256 can see it
    tampered.write_bytes(bytes(data))
    shutil.copy(src.with_suffix(".json"), tampered.with_suffix(".json"))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        E.load_classifier(tampered)


def test_attrs_to_targets_gives_one_answer_per_picture():
    heads = E.CONFIGS["shapes"]().heads
    a_below_b = torch.tensor([[0, 1, 0, 2, 3, 1, 1]])  # small green circle below a large yellow triangle
    b_above_a = torch.tensor([[2, 3, 1, 0, 1, 0, 0]])  # the same picture, described the other way
    single = torch.tensor([[4, 5, 1, -1, -1, -1, -1]])
    assert torch.equal(E.attrs_to_targets(a_below_b, heads), E.attrs_to_targets(b_above_a, heads))
    assert E.attrs_to_targets(single, heads).tolist() == [[4, 5, 1, 5, 6, 2, 2]]  # absent = last class


def test_train_classifier_lowers_the_loss(gen):
    images, targets = E.training_data("fashion-mnist", "test", n=256)
    model = E.build_classifier("fashion-mnist")
    losses = evaluator_training.train_classifier(model, images, targets, steps=25, batch_size=32, generator=gen, log_every=0)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    with pytest.raises(ValueError, match="dataset must be one of"):
        E.build_classifier("imagenet")


def test_inception_fid_without_weights_raises_a_clear_error(monkeypatch):
    import torchvision.models

    def offline(**kw):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.models, "inception_v3", offline)
    with pytest.raises(RuntimeError, match="Inception-v3 weights.*could not be downloaded"):
        E.inception_features(torch.zeros(1, 1, 28, 28))
