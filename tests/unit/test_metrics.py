"""The metric math (vitdit.metrics) and the paper-FID plumbing (vitdit.fid) on known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from vitdit import metrics
from vitdit.errors import UnsafeCheckpointError, VitditError


def _gaussian(n, d, seed, shift=None):
    """n samples of one fixed correlated Gaussian in d dimensions (``seed`` picks the samples)."""
    a = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)
    x = np.random.default_rng(seed).normal(size=(n, d)) @ a.T + 0.5
    return x + (0 if shift is None else shift)


# The FD tolerances below are float64 (u = 2^-53 ≈ 1.1e-16) bounds. An eigendecomposition of a d×d
# covariance moves each eigenvalue by ~u·λ_max, hence each √λ by ~u·√(λ_max·κ) (κ = λ_max/λ_min, ≤ 1e5
# for these data): Tr√ is off by ~d·u·√(λ_max·κ) ≲ 1e-11 at d ≤ 16, whatever LAPACK kernel runs it.


def test_fd_identical_sets_is_zero():
    x = _gaussian(500, 16, 0)
    assert abs(metrics.frechet_distance_features(x, x)) < 1e-8  # float64 bound above, ×1000


def test_fd_shift_is_squared_norm():
    # Same covariance, means shifted by δ: FD = ‖δ‖² exactly (the trace terms cancel).
    x = _gaussian(2000, 8, 1)
    delta = np.linspace(-1, 2, 8)
    fd = metrics.frechet_distance_features(x, x + delta)
    assert fd == pytest.approx(float(delta @ delta), rel=1e-8)  # float64 bound above: 1e-7 at FD ≈ 10, ×10^4


def test_fd_matches_scipy_sqrtm_on_random_data():
    a, b = _gaussian(300, 12, 2), _gaussian(400, 12, 3, shift=0.3) * 1.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))
    assert expected > 1.0  # the sets differ, so this is not a comparison of zeros
    # Two float64 algorithms (eigh vs scipy's Schur sqrtm) on the same statistics: the bound above, ×10^4.
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_fd_singular_covariance_is_finite():
    # Fewer samples than dimensions (the usual case for a small eval): covariances are singular.
    a, b = _gaussian(10, 32, 4), _gaussian(10, 32, 5)
    fd = metrics.frechet_distance_features(a, b)
    assert np.isfinite(fd) and fd > 0


def test_kid_unbiased_on_equal_distributions_and_positive_when_shifted():
    x, y = _gaussian(600, 16, 6), _gaussian(600, 16, 7)
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=20, subset_size=300)
    # Unbiased: two samples of one distribution give ~0 (within a few subset std's), not a bias > 0.
    assert abs(mean) < 3 * std / np.sqrt(20) + 1e-3
    identical_mean, _ = metrics.kernel_inception_distance(x, x, num_subsets=5, subset_size=300)
    assert abs(identical_mean) < 0.05
    shifted, _ = metrics.kernel_inception_distance(x, y + 1.0, num_subsets=20, subset_size=300)
    assert shifted > 0.1 and shifted > 20 * abs(mean)


def test_precision_recall_identical_and_separated_clouds():
    x = _gaussian(300, 8, 8)
    assert metrics.precision_recall(x, x, k=3) == (1.0, 1.0)
    far = _gaussian(300, 8, 9, shift=100.0)
    assert metrics.precision_recall(x, far, k=3) == (0.0, 0.0)
    # A fake set that covers half of the real modes: high precision, recall about one half.
    rng = np.random.default_rng(10)
    modes = np.stack([rng.normal(size=300) * 0.1 + m for m in (0.0, 50.0)])  # 2, 300
    real = np.concatenate(
        [modes[0][:, None] + rng.normal(size=(300, 4)) * 0.1, 50 + rng.normal(size=(300, 4))]
    )
    fake = real[:300] + rng.normal(size=(300, 4)) * 0.01
    p, r = metrics.precision_recall(real, fake, k=3)
    assert p > 0.95 and 0.4 < r < 0.6


def test_inception_score_bounds():
    # Confident predictions spread evenly over C classes → score C; identical predictions → 1.
    c = 5
    confident = np.eye(c)[np.arange(100) % c] * 50.0
    mean, _ = metrics.inception_score(confident, splits=2)
    # float64 softmax/log/exp over 5 classes: errors of a few u = 2^-53, far inside both tolerances.
    assert mean == pytest.approx(c, rel=1e-6)
    same = np.tile(np.array([[3.0, 1.0, 0.0, 0.0, 0.0]]), (100, 1))
    assert metrics.inception_score(same, splits=2)[0] == pytest.approx(1.0, abs=1e-9)


def test_classification_accuracy_per_class():
    logits = np.eye(3)[[0, 0, 1, 2, 2, 1]]
    labels = [0, 0, 1, 2, 1, 2]
    overall, per_class = metrics.classification_accuracy(logits, labels, ["a", "b", "c"])
    assert overall == pytest.approx(4 / 6)
    assert per_class == {"a": 1.0, "b": 0.5, "c": 0.5}


def test_bad_inputs_raise_vitdit_error():
    with pytest.raises(VitditError, match="N×D"):
        metrics.frechet_distance_features(np.zeros(5), np.zeros(5))
    with pytest.raises(VitditError, match="k=3"):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """A randomly initialised TF-Inception (torch-fidelity's architecture) saved as a state dict.

    torch-fidelity's constructor always loads a file; a subclass that ignores the loaded dict gives
    PyTorch's default initialisation, whose state dict the test saves like a real weights file.
    """
    pytest.importorskip("torch_fidelity", reason="FID needs the optional extra: pip install -e '.[fid]'")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pth")
    torch.manual_seed(0)
    net = _Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pth"))
    path = root / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.mark.slow  # ~140 s on 2 cores: building and running a full-size InceptionV3
def test_fid_plumbing_with_random_inception(random_inception_file, tmp_path):
    from vitdit import fid

    rng = np.random.default_rng(0)
    # Few images: one 299×299 Inception forward costs ~1-4 s on this shared 2-core machine.
    a = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a[:2].astype(int) + 120, 0, 255).astype(np.uint8)
    net = fid.load_inception(random_inception_file)
    f_a, z_a = fid.inception_features(net, a, batch_size=2)  # two batches: 2 + 1
    assert f_a.shape == (3, 2048) and z_a.shape == (3, 1008)
    f_b, _ = fid.inception_features(net, b, batch_size=2)
    # The library's FID agrees with vitdit.metrics on the same features, is 0 on identical sets and
    # positive on different ones.
    assert fid.fid_from_features(f_a, f_a) == pytest.approx(0.0, abs=1e-6)
    d = fid.fid_from_features(f_a, f_b)
    assert d > 0
    assert metrics.frechet_distance_features(f_a, f_b) == pytest.approx(d, rel=1e-4, abs=1e-8)
    is_mean, _ = fid.is_from_logits(z_a, splits=1)
    assert 1.0 - 1e-9 <= is_mean <= 1008

    # A pickle that would run code is refused before torch-fidelity unpickles it.
    bad = tmp_path / "bad.pth"
    torch.save({"x": object()}, bad)
    with pytest.raises(UnsafeCheckpointError):
        fid.load_inception(str(bad))
    with pytest.raises(VitditError, match="never downloaded"):
        fid.load_inception(str(tmp_path / "missing.pth"))
