"""Sample-quality metrics on feature vectors: Fréchet distance, KID, precision/recall, IS, accuracy.

The functions take features (N×D arrays) and logits from any extractor. vitdit's evaluation feeds
them the features of a trained in-domain ViT classifier, so the numbers are only comparable between
runs that used the same classifier (its hash travels with every metric); ``vitdit.fid`` computes
the paper-comparable FID / IS with TF-Inception features.

All statistics are computed in float64: the Fréchet distance subtracts numbers of similar size and
loses most of its digits in float32.
"""

from __future__ import annotations

import numpy as np
import torch

from vitdit.errors import VitditError


def _as_2d(name: str, x) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2 or len(a) == 0:
        raise VitditError(f"{name}: expected a non-empty N×D feature array, got shape {a.shape}")
    return a


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of N×D features."""
    f = _as_2d("features", features)
    if len(f) < 2:
        raise VitditError("features: need at least 2 samples for a covariance")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) between two Gaussians.

    Tr((Σ₁Σ₂)^½) is computed as Tr((Σ₁^½ Σ₂ Σ₁^½)^½): the two matrices are similar, and the second
    is symmetric PSD, so an eigendecomposition replaces scipy's general ``sqrtm`` (which returns
    complex round-off and fails on singular covariances, the usual case with fewer samples than
    dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise VitditError(f"frechet_distance: statistics of different shapes {mu1.shape} vs {mu2.shape}")
    s1_half = _sqrtm_psd(sigma1)
    middle = s1_half @ sigma2 @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_features(features1, features2) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when they are pool3)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # KID's cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³ (Bińkowski et al., 2018).
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(
    features1, features2, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD² with the cubic polynomial kernel, averaged over random subsets: (mean, std).

    Unbiased: the diagonal terms k(x, x) are left out, so two samples of one distribution give a
    mean near 0 (negative values are possible and expected).
    """
    x, y = _as_2d("features1", features1), _as_2d("features2", features2)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise VitditError(
            f"kernel_inception_distance: need at least 2 samples per set, got {len(x)}, {len(y)}"
        )
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = _poly_kernel(xs, xs), _poly_kernel(ys, ys), _poly_kernel(xs, ys)
        off = m * (m - 1)
        mmd = (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i : i + chunk], b) for i in range(0, len(a), chunk)])


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    # Distance to the k-th nearest neighbour other than the point itself (column 0 is the point).
    d = _pairwise_distances(x, x)
    return d.kthvalue(k + 1, dim=1).values


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    inside = 0
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i : i + chunk], centres)  # n, M
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds.

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest neighbour. Precision: fraction of fake samples inside the real manifold (quality);
    recall: fraction of real samples inside the fake manifold (coverage).
    """
    real = torch.from_numpy(_as_2d("real_features", real_features))
    fake = torch.from_numpy(_as_2d("fake_features", fake_features))
    if min(len(real), len(fake)) <= k:
        raise VitditError(
            f"precision_recall: need more than k={k} samples per set, got {len(real)}, {len(fake)}"
        )
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) ‖ p(y))) over ``splits`` equal parts of the samples: (mean, std).

    With a vitdit classifier's logits this is an "Inception-Score-style" score: its maximum is the
    number of classes, reached by confident predictions spread evenly over the classes.
    """
    z = torch.from_numpy(_as_2d("logits", logits))
    splits = max(1, min(splits, len(z)))
    log_p = torch.log_softmax(z, dim=1)  # N, classes
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_py = torch.logsumexp(part, dim=0) - np.log(len(part))  # log of the marginal p(y)
        kl = (part.exp() * (part - log_py[None, :])).sum(dim=1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def classification_accuracy(
    logits, labels, class_names: list[str] | None = None
) -> tuple[float, dict[str, float]]:
    """Overall top-1 accuracy and accuracy per class present in ``labels`` (keyed by class name)."""
    z = _as_2d("logits", logits)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(y) != len(z):
        raise VitditError(f"classification_accuracy: {len(z)} logits but {len(y)} labels")
    pred = z.argmax(axis=1)
    per_class = {}
    for c in np.unique(y):
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(int(c))
        per_class[name] = float((pred[y == c] == c).mean())
    return float((pred == y).mean()), per_class
