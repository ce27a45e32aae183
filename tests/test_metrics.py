"""Metrics against closed forms and cases that cannot be fudged (scipy is a test-only reference)."""
import numpy as np
import pytest
import scipy.linalg
import torch

from minidiff.eval import metrics


def _random_cov(d, gen):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _scipy_frechet(mu1, s1, mu2, s2):
    """Reference: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) with scipy's sqrtm."""
    mu1, s1, mu2, s2 = (t.numpy() for t in (mu1, s1, mu2, s2))
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * cross))


def test_frechet_matches_scipy_closed_form(gen):
    d = 16
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    s1, s2 = _random_cov(d, gen), _random_cov(d, gen)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_of_diagonal_gaussians_is_analytic():
    # For diagonal covariances: sum (mu1 - mu2)^2 + sum (sqrt(v1) - sqrt(v2))^2.
    v1, v2 = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    mu1, mu2 = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    expected = 1 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert metrics.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_identical_features_is_zero(gen):
    feats = torch.randn(500, 64, generator=gen)
    assert metrics.frechet_distance_from_features(feats, feats.clone()) == pytest.approx(0.0, abs=1e-6)


def test_fid_on_gaussian_samples_matches_population_value(gen):
    d, n = 8, 20000
    s1, s2 = _random_cov(d, gen), _random_cov(d, gen)
    mu2 = torch.full((d,), 0.5, dtype=torch.float64)
    x1 = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    x2 = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s2).T + mu2
    population = _scipy_frechet(torch.zeros(d, dtype=torch.float64), s1, mu2, s2)
    assert metrics.frechet_distance_from_features(x1, x2) == pytest.approx(population, rel=0.05)


def test_fid_grows_monotonically_with_mean_shift(gen):
    a = torch.randn(1000, 32, generator=gen)
    b = torch.randn(1000, 32, generator=gen)
    fids = [metrics.frechet_distance_from_features(a, b + shift) for shift in (0.0, 0.1, 0.3, 0.6, 1.0)]
    assert all(x < y for x, y in zip(fids, fids[1:])), fids


def test_small_n_biases_fid_upward_and_floor_measures_it(gen):
    pool_a, pool_b = torch.randn(4000, 32, generator=gen), torch.randn(4000, 32, generator=gen)
    floor_small = metrics.real_vs_real_floor(pool_a, pool_b, n=200, generator=gen)
    floor_large = metrics.real_vs_real_floor(pool_a, pool_b, n=4000, generator=gen)
    assert floor_small > 3 * floor_large > 0


def test_kid_near_zero_for_same_distribution_and_positive_for_shift(gen):
    a, b = torch.randn(600, 32, generator=gen), torch.randn(600, 32, generator=gen)
    same_mean, same_std = metrics.kid(a, b, num_subsets=20, subset_size=300, generator=gen)
    shifted_mean, _ = metrics.kid(a, b + 0.5, num_subsets=20, subset_size=300, generator=gen)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 10 * max(abs(same_mean), same_std)
    identical = metrics.kid(a, a, num_subsets=5, subset_size=600, generator=gen)[0]
    assert -0.1 * shifted_mean < identical <= 0.0  # the unbiased estimate is slightly negative for X == Y


def test_kid_matches_naive_unbiased_formula(gen):
    x, y = torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen, dtype=torch.float64)
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 7
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    assert metrics.kid(x, y, num_subsets=1, subset_size=7)[0] == pytest.approx(float(kxx + kyy - 2 * kxy), rel=1e-10)


def test_precision_recall_identical_and_disjoint(gen):
    a = torch.randn(400, 16, generator=gen)
    assert metrics.precision_recall(a, a.clone()) == (1.0, 1.0)
    p, r = metrics.precision_recall(a, a + 100.0)
    assert p == 0.0 and r == 0.0


def test_precision_recall_separate_fidelity_from_coverage(gen):
    real = torch.randn(1000, 8, generator=gen)
    collapsed = 0.3 * torch.randn(1000, 8, generator=gen)  # samples near the mode: faithful but not diverse
    p, r = metrics.precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.5


def test_class_accuracy_counts_matches():
    class Fixed(torch.nn.Module):  # "classifier" that reads the class from the first pixel
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()
    images = torch.zeros(4, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert metrics.class_accuracy(Fixed(), images, torch.tensor([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError, match="labels must be"):
        metrics.class_accuracy(Fixed(), images, torch.tensor([1, 2]))


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(1, 3), torch.full((4, 2), float("nan"))])
def test_bad_feature_shapes_raise(bad):
    with pytest.raises(ValueError, match="feats"):
        metrics.frechet_distance_from_features(bad, torch.zeros(4, 2))


# ---------------------------------------------------------------- reconstruction metrics: PSNR and SSIM

def test_psnr_closed_form(gen):
    x = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64) - 0.5  # in [-0.5, 0.5]: x + c is not clipped
    for c in (0.02, 0.2, -0.4):
        # images are in [-1, 1]: a shift c is c / 2 on the [0, 1] scale, so MSE = (c / 2)^2
        expected = 10 * np.log10(1 / (c / 2) ** 2)
        torch.testing.assert_close(metrics.psnr(x, x + c), torch.full((3,), expected, dtype=torch.float64))
    assert metrics.psnr(x, x).tolist() == [float("inf")] * 3
    y = x.clone()
    y[1] += 0.2  # per image: only the second differs
    assert metrics.psnr(x, y)[0] == float("inf") and metrics.psnr(x, y)[1] == pytest.approx(20.0)


def _skimage_ssim(x, y):
    from skimage.metrics import structural_similarity
    return torch.tensor([structural_similarity(((a.double() + 1) / 2).numpy(), ((b.double() + 1) / 2).numpy(),
                                               gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                               data_range=1.0, channel_axis=0) for a, b in zip(x, y)],
                        dtype=torch.float64)


def _smooth(n, size, gen):
    coarse = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


@pytest.mark.parametrize("kind", ["random", "smooth", "unrelated", "non-square"])
def test_ssim_matches_skimage(gen, kind):
    """skimage (gaussian_weights, sigma 1.5, truncate 3.5 -> an 11-tap window) filters with mode="reflect" and then
    crops (win_size - 1) // 2 = 5 pixels from every side before averaging, i.e. it averages exactly the valid
    (unpadded) positions that ours does, per channel, then over the channels. Measured: they agree to 1e-15."""
    if kind == "random":
        x = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
        y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    elif kind == "smooth":
        x = _smooth(3, 32, gen)
        y = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    elif kind == "unrelated":
        x, y = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, _smooth(2, 16, gen)
    else:
        x, y = torch.rand(2, 3, 17, 23, generator=gen) * 2 - 1, torch.rand(2, 3, 17, 23, generator=gen) * 2 - 1
    torch.testing.assert_close(metrics.ssim(x, y), _skimage_ssim(x, y), atol=1e-12, rtol=0)


def test_ssim_of_identical_images_is_one_and_errors(gen):
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    assert metrics.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert (metrics.ssim(x, -x) < 0.5).all()
    with pytest.raises(ValueError, match=r"x and y must have the same shape, got \(2, 3, 16, 16\) and \(2, 3, 16, 8\)"):
        metrics.ssim(x, x[..., :8])
    with pytest.raises(ValueError, match=r"x and y must have the same shape"):
        metrics.psnr(x, x[:1])
    with pytest.raises(ValueError, match=r"ssim: images must be at least window=11 pixels a side, got \(8, 8\)"):
        metrics.ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match=r"y must have 4 dims"):
        metrics.psnr(x, x[0])
