"""Sample-quality metrics on feature vectors: FID, KID, precision/recall, class accuracy, prompt adherence.

All distribution metrics take features ``(N, d)`` (from ``minidiff.eval.classifiers``: the shipped classifier's
penultimate layer) and compute in float64 on the CPU. Notation:

| symbol          | code        | meaning                                                   |
|-----------------|-------------|-----------------------------------------------------------|
| mu_r, Sigma_r   | mu1, sigma1 | mean and covariance of the real features                  |
| mu_g, Sigma_g   | mu2, sigma2 | mean and covariance of the generated features             |
| k(x, y)         | ``_poly``   | KID kernel (x.y / d + 1)^3                                |
| NN_k(phi)       | ``radii``   | distance from a feature to its k-th nearest neighbour     |

Sample size matters: FID is biased upward for small N (Binkowski et al. 2018; Chong & Forsyth 2020), so an FID
is only comparable with one computed at the same N, and ``real_vs_real_floor`` gives the value two real sets
of that N reach. Report it beside every FID.
"""
from __future__ import annotations

import torch

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features", "kid",
           "precision_recall", "real_vs_real_floor", "class_accuracy", "saturated_share", "prompt_adherence"]


def _as_features(name: str, feats) -> torch.Tensor:
    feats = torch.as_tensor(feats).detach().cpu().to(torch.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D (N, d) feature tensor with N >= 2, got shape {tuple(feats.shape)}")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} must be finite, got NaN/inf values")
    return feats


def feature_statistics(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and unbiased covariance (d, d), float64, of features (N, d)."""
    feats = _as_features("feats", feats)
    mu = feats.mean(0)
    centered = feats - mu
    return mu, centered.T @ centered / (feats.shape[0] - 1)


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix via eigh (tiny negative eigenvalues clipped)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of two Gaussians, Dowson & Landau 1982; FID, Heusel et al. 2017, Eq. 6.

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2). The cross term uses the symmetric form, whose
    eigenvalues are real and >= 0, so eigh in float64 is stable where sqrtm(S1 S2) of a non-symmetric product
    returns complex noise.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"mu1/mu2 must be (d,) and sigma1/sigma2 (d, d), got {tuple(mu1.shape)}, "
                         f"{tuple(mu2.shape)}, {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    root1 = _sqrt_psd(sigma1)
    cross = root1 @ sigma2 @ root1
    eig = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp(min=0)
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * eig.sqrt().sum()
    return float(d2.clamp(min=0))


def frechet_distance_from_features(feats1, feats2) -> float:
    """FID between two feature sets (N1, d) and (N2, d). Biased upward for small N: compare at equal N only.

    The bias is roughly c / N for a constant c growing with d (Chong & Forsyth 2020): with d = 128 classifier
    features, N = 1000 already adds a visible offset; ``real_vs_real_floor`` at the same N measures it.
    """
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


def _poly(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018, Sec. 4)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 estimate (Gretton et al. 2012, Eq. 3) with the cubic kernel."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _poly(x, x), _poly(y, y), _poly(x, y)
    off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # noqa: E731 (mean over i != j)
    return off(k_xx) + off(k_yy) - 2 * k_xy.mean()


def kid(feats1, feats2, *, num_subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel Inception Distance, Binkowski et al. 2018: mean and std of unbiased MMD^2 over random subsets.

    Unbiased at every N (it comes out slightly negative when the sets match, even for identical sets, since
    the cross term keeps k(x_i, x_i)), so unlike FID it can be
    compared across sample sizes; its variance shrinks as 1/N, so small N gives a noisy (not shifted) value.
    ``subset_size`` is capped at the smaller set.
    """
    feats1, feats2 = _as_features("feats1", feats1), _as_features("feats2", feats2)
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"num_subsets must be >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}")
    m = min(subset_size, feats1.shape[0], feats2.shape[0])
    vals = torch.stack([
        _mmd2_unbiased(feats1[torch.randperm(feats1.shape[0], generator=generator)[:m]],
                       feats2[torch.randperm(feats2.shape[0], generator=generator)[:m]])
        for _ in range(num_subsets)])
    return float(vals.mean()), float(vals.std()) if num_subsets > 1 else 0.0


def _kth_nn_radii(feats: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    return torch.cat([torch.cdist(fb, feats).kthvalue(k + 1, dim=1).values for fb in feats.split(batch_size)])


def _coverage(queries: torch.Tensor, refs: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of queries inside at least one ball (ref_j, radius_j)."""
    inside = [(torch.cdist(qb, refs) <= radii[None, :]).any(1) for qb in queries.split(batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_feats, fake_feats, *, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall, Kynkaanniemi et al. 2019, Eq. 1-2 (k-NN balls, k = 3).

    precision: fraction of generated features inside the k-NN ball of some real feature (fidelity);
    recall: fraction of real features inside the k-NN ball of some generated feature (coverage).
    Depends on N: balls shrink as N grows, so both need equal, fixed N to be compared (the paper uses 50k;
    with a few thousand samples the values are optimistic and noisy by a few points).
    """
    real, fake = _as_features("real_feats", real_feats), _as_features("fake_feats", fake_feats)
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be in 1..{min(real.shape[0], fake.shape[0]) - 1} for these sets, got {k}")
    real_radii = _kth_nn_radii(real, k, batch_size)
    fake_radii = _kth_nn_radii(fake, k, batch_size)
    precision = _coverage(fake, real, real_radii, batch_size)
    recall = _coverage(real, fake, fake_radii, batch_size)
    return precision, recall


def real_vs_real_floor(train_feats, test_feats, *, n: int, generator: torch.Generator | None = None) -> float:
    """FID between ``n`` random train and ``n`` random test features: the best score reachable at this N.

    A generator that matched the data perfectly would still score about this much, because FID is biased
    upward at finite N; print it beside every FID computed from ``n`` samples.
    """
    train, test = _as_features("train_feats", train_feats), _as_features("test_feats", test_feats)
    if not 2 <= n <= min(train.shape[0], test.shape[0]):
        raise ValueError(f"n must be in 2..{min(train.shape[0], test.shape[0])} (the smaller feature set), got {n}")
    pick = lambda f: f[torch.randperm(f.shape[0], generator=generator)[:n]]  # noqa: E731
    return frechet_distance_from_features(pick(train), pick(test))


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


@torch.no_grad()
def class_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> float:
    """Fraction of class-conditional samples that the classifier assigns to the class they were asked for.

    A binomial proportion: its standard error is sqrt(p (1 - p) / N), about 1 point at N = 1000, p = 0.9.
    """
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be (N,) matching images (N, ...), got {tuple(labels.shape)} "
                         f"and {tuple(images.shape)}")
    classifier.eval()
    device = _device_of(classifier)
    preds = torch.cat([classifier(xb.to(device)).argmax(1).cpu() for xb in images.split(batch_size)])
    return float((preds == labels.cpu()).double().mean())


def saturated_share(images: torch.Tensor, *, threshold: float = 0.98) -> float:
    """Share of pixels at or above ``threshold`` in images in [-1, 1]: the "blown-out" white of a sampler that
    overshoots (an eps-prediction model amplifies its error by sigma_max at the first step and the clip at +1
    catches it). Compare with the same share on real images; only the bright end is counted, since black
    background is most of a Fashion-MNIST image.
    """
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or images.numel() == 0:
        raise ValueError(f"images must be a non-empty tensor (N, ...), got {getattr(images, 'shape', type(images))}")
    if not -1.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (-1, 1], got {threshold}")
    return float((images >= threshold).double().mean())


@torch.no_grad()
def prompt_adherence(classifier, images: torch.Tensor, attrs: torch.Tensor, *, batch_size: int = 500) -> dict:
    """Prompt adherence for "shapes": the fraction of images whose attributes, read by the shipped attribute
    classifier, all match the prompt's ``attrs`` (N, 7) (-1 = absent), under 'all', plus the rate per attribute.

    Binomial proportions (standard error about 1.5 points at N = 1000 and p = 0.8); bounded above by the
    classifier's own accuracy on real images (see its model card), which the rates should be read against.
    """
    from minidiff.eval.classifiers import attrs_to_targets
    targets = attrs_to_targets(attrs, classifier.config.heads)
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"attrs must have one row per image, got {targets.shape[0]} rows for {images.shape[0]} images")
    classifier.eval()
    device = _device_of(classifier)
    preds = torch.cat([torch.stack([o.argmax(1).cpu() for o in classifier.logits(xb.to(device)).values()], 1)
                       for xb in images.split(batch_size)])
    correct = preds == targets
    rates = {name: float(correct[:, j].double().mean()) for j, name in enumerate(classifier.config.heads)}
    return {"all": float(correct.all(1).double().mean()), **rates}


# ---------------------------------------------------------------- reconstruction metrics (pairs of images)

def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two image batches (B, C, H, W) in [-1, 1] -> float64 in [0, 1] (the range PSNR and SSIM are defined on)."""
    from minidiff.utils import check_tensor
    x, y = check_tensor("x", x, ndim=4), check_tensor("y", y, ndim=4)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return ((x.double() + 1) / 2).clamp(0, 1), ((y.double() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (B,) in dB, 10 log10(1 / MSE) on the [0, 1] scale; inf where x == y."""
    x, y = _pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (B,), Wang et al. 2004, Eq. 13: Gaussian window (11, sigma 1.5), K1 = 0.01,
    K2 = 0.03, data range 1, per channel, averaged over the valid (unpadded) positions and the channels.
    Single-scale: MS-SSIM needs images of at least 160 pixels a side."""
    import torch.nn.functional as F
    x, y = _pair(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images must be at least window={window} pixels a side, got {tuple(x.shape[-2:])}")
    C = x.shape[1]
    w = _gaussian_window(window, sigma).to(x.device).expand(C, 1, window, window)
    def blur(t):
        return F.conv2d(t, w, groups=C)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


__all__ += ["psnr", "ssim"]
