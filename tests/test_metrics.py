"""Known-answer tests for diffusers_cfg.training.metrics on synthetic features."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers_cfg.training.metrics import (
    class_accuracy,
    fit_gaussian,
    frechet_distance,
    gaussian_frechet_distance,
    mean_and_spread,
    precision_recall,
)

# A non-diagonal pair of 2-D Gaussians shared by several tests.
MU_A = np.array([0.0, 0.0])
COV_A = np.array([[2.0, 0.6], [0.6, 1.0]])
MU_B = np.array([1.0, -0.5])
COV_B = np.array([[1.0, -0.3], [-0.3, 0.5]])


def rotation(dimension, seed):
    """Return a random orthogonal matrix, the Q factor of a Gaussian matrix."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dimension, dimension)))
    return q


# Fréchet distance: closed form.


def test_gaussian_frechet_diagonal():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])

    # Diagonal covariances commute, so the covariance term is sum((sqrt(var_a) - sqrt(var_b))^2).
    expected = 1.0 + 4.0 + (1.0 - 2.0) ** 2 + (2.0 - 1.0) ** 2 + 0.0

    result = gaussian_frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert result == pytest.approx(expected, abs=1e-12)


def test_gaussian_frechet_2x2_by_hand():
    # For a 2x2 matrix M with eigenvalues l1, l2 >= 0, (sqrt(l1) + sqrt(l2))^2 = tr(M) + 2 sqrt(det(M)).
    # tr(sqrt(COV_A COV_B)) therefore has a closed form that needs no matrix square root.
    product = COV_A @ COV_B
    trace_sqrt = math.sqrt(np.trace(product) + 2.0 * math.sqrt(np.linalg.det(COV_A) * np.linalg.det(COV_B)))
    expected = np.sum((MU_A - MU_B) ** 2) + np.trace(COV_A) + np.trace(COV_B) - 2.0 * trace_sqrt

    assert gaussian_frechet_distance(MU_A, COV_A, MU_B, COV_B) == pytest.approx(expected, abs=1e-12)


def test_gaussian_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    dimension = 6
    factor_a = rng.standard_normal((dimension, dimension))
    factor_b = rng.standard_normal((dimension, dimension))
    cov_a = factor_a @ factor_a.T + 0.1 * np.eye(dimension)
    cov_b = factor_b @ factor_b.T + 0.1 * np.eye(dimension)
    mu_a, mu_b = rng.standard_normal(dimension), rng.standard_normal(dimension)

    # The non-symmetric route: tr(sqrtm(cov_a @ cov_b)), well conditioned for these full-rank matrices.
    trace_sqrt = np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt

    assert gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)


def test_gaussian_frechet_commuting_rotated_pair():
    # Rotating two diagonal covariances by the same rotation keeps the distance of the diagonal pair.
    q = rotation(4, seed=1)
    var_a, var_b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 0.5, 3.0, 0.25])
    expected = np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)

    result = gaussian_frechet_distance(np.zeros(4), q @ np.diag(var_a) @ q.T, np.zeros(4), q @ np.diag(var_b) @ q.T)
    assert result == pytest.approx(expected, rel=1e-10)


def test_gaussian_frechet_mean_shift_only():
    shift = np.array([3.0, -4.0])
    assert gaussian_frechet_distance(MU_A, COV_A, MU_A + shift, COV_A) == pytest.approx(25.0, abs=1e-12)


def test_gaussian_frechet_is_symmetric():
    forward = gaussian_frechet_distance(MU_A, COV_A, MU_B, COV_B)
    backward = gaussian_frechet_distance(MU_B, COV_B, MU_A, COV_A)
    assert forward == pytest.approx(backward, rel=1e-12)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ((np.zeros((2, 1)), np.eye(2), np.zeros(2), np.eye(2)), "mu_a"),
        ((np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "mu_a and mu_b"),
        ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "cov_a"),
        ((np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]])), "cov_b must be symmetric"),
        ((np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2)), "cov_a must be positive semi-definite"),
        ((np.array([0.0, np.nan]), np.eye(2), np.zeros(2), np.eye(2)), "mu_a"),
    ],
)
def test_gaussian_frechet_rejects_invalid(arguments, name):
    with pytest.raises(ValueError, match=name):
        gaussian_frechet_distance(*arguments)


# Fréchet distance: from features.


def test_frechet_identical_sets_is_zero():
    features = np.random.default_rng(0).standard_normal((500, 32)) * 3.0 + 5.0
    # The covariance trace is about 32 * 9, so this bound is rounding error, far below any real distance.
    assert frechet_distance(features, features.copy()) < 1e-9


def test_frechet_identical_sets_never_negative():
    # For identical sets the exact value is 0, and about half of these seeds round to a tiny negative
    # number before the final clamp.
    for seed in range(10):
        features = np.random.default_rng(seed).standard_normal((40, 20)) * 3.0 + 5.0
        result = frechet_distance(features, features.copy())
        assert result >= 0.0, f"seed {seed}"
        assert result < 1e-9, f"seed {seed}"


def test_frechet_same_gaussian_matches_sampling_bias():
    rng = np.random.default_rng(0)
    num_samples, dimension = 20_000, 16
    features_a = rng.standard_normal((num_samples, dimension))
    features_b = rng.standard_normal((num_samples, dimension))

    # Two independent samples of N(0, I) still differ. The means contribute E|mean_a - mean_b|^2 = 2D/N.
    # To second order, each covariance entry differs by noise of variance 2(1 + [i == j])/N, and the
    # covariance term is a quarter of their squared sum, D(D + 1)/(2N). Over 20 seeds the result was
    # within 17% of this sum, with a standard deviation of 8%.
    expected_bias = 2 * dimension / num_samples + dimension * (dimension + 1) / (2 * num_samples)

    result = frechet_distance(features_a, features_b)
    assert result > 0.7 * expected_bias
    assert result < 1.4 * expected_bias


def test_frechet_samples_match_closed_form():
    rng = np.random.default_rng(1)
    num_samples = 20_000
    features_a = rng.multivariate_normal(MU_A, COV_A, size=num_samples)
    features_b = rng.multivariate_normal(MU_B, COV_B, size=num_samples)

    # Most of the estimate's noise comes from the mean term |mu_a - mu_b + e|^2, whose linear part
    # 2 (mu_a - mu_b).e has standard deviation 2 sqrt(dmu' (COV_A + COV_B) dmu / N). Over 200 seeds the
    # estimate's standard deviation was 1.1 times that, so 6 of them is a safe tolerance.
    delta_mu = MU_A - MU_B
    noise_std = 2.0 * math.sqrt(delta_mu @ (COV_A + COV_B) @ delta_mu / num_samples)

    expected = gaussian_frechet_distance(MU_A, COV_A, MU_B, COV_B)
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, abs=6 * noise_std)


def test_frechet_mean_shift_only():
    features = np.random.default_rng(2).standard_normal((1000, 8))
    shift = np.arange(8, dtype=np.float64)
    assert frechet_distance(features, features + shift) == pytest.approx(np.sum(shift**2), rel=1e-9)


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(3)
    # 10 samples in 64 dimensions give covariances of rank 9.
    features_a = rng.standard_normal((10, 64))
    features_b = rng.standard_normal((10, 64)) + 0.5

    forward = frechet_distance(features_a, features_b)
    backward = frechet_distance(features_b, features_a)
    assert math.isfinite(forward)
    assert forward > 0.0
    assert forward == pytest.approx(backward, rel=1e-9)
    assert frechet_distance(features_a, features_a.copy()) < 1e-9


def test_frechet_accepts_torch_tensors():
    features_a = np.random.default_rng(4).standard_normal((200, 4))
    features_b = features_a * 2.0 + 1.0
    expected = frechet_distance(features_a, features_b)
    result = frechet_distance(torch.from_numpy(features_a), torch.from_numpy(features_b).to(torch.float32))
    assert result == pytest.approx(expected, rel=1e-5)


def test_fit_gaussian_uses_sample_covariance():
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mean, covariance = fit_gaussian(features)
    np.testing.assert_allclose(mean, [1.0, 1.0])
    # Each column has squared deviations summing to 4 over 4 rows, so ddof=1 gives 4 / 3.
    np.testing.assert_allclose(covariance, np.diag([4.0 / 3.0, 4.0 / 3.0]), atol=1e-15)


@pytest.mark.parametrize(
    ("features_a", "features_b", "message"),
    [
        (np.zeros(5), np.zeros((5, 1)), r"features_a must be a 2-D array .* got shape \(5,\)"),
        (np.zeros((5, 2)), np.zeros((1, 2)), "features_b must have at least 2 rows"),
        (np.zeros((5, 2)), np.zeros((5, 3)), r"same number of features .* \(5, 2\) and \(5, 3\)"),
        (np.array([[0.0, 1.0], [np.inf, 0.0]]), np.zeros((5, 2)), "features_a must contain only finite values"),
    ],
)
def test_frechet_rejects_invalid(features_a, features_b, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(features_a, features_b)


# Precision and recall.


def test_precision_recall_identical_sets():
    features = np.random.default_rng(0).standard_normal((300, 8))
    assert precision_recall(features, features.copy()) == (1.0, 1.0)


def test_precision_recall_disjoint_sets():
    real = np.random.default_rng(0).standard_normal((300, 8))
    fake = real + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_mode_collapse():
    rng = np.random.default_rng(0)
    dimension = 4
    mode_a = rng.standard_normal((500, dimension))
    mode_b = rng.standard_normal((500, dimension)) + 20.0
    real = np.concatenate([mode_a, mode_b])
    fake_one_mode = rng.standard_normal((1000, dimension))
    fake_both_modes = np.concatenate(
        [rng.standard_normal((500, dimension)), rng.standard_normal((500, dimension)) + 20.0]
    )

    precision, recall = precision_recall(real, fake_one_mode)
    # Fresh samples of one mode mostly fall inside the real balls. No fake ball reaches the other
    # mode, 20 standard deviations away, so at most half of the real points are covered.
    assert precision > 0.9
    assert 0.4 < recall <= 0.5

    precision_both, recall_both = precision_recall(real, fake_both_modes)
    assert precision_both > 0.9
    assert recall_both > 0.9


def test_precision_recall_hand_computed_1d():
    real = np.array([[0.0], [1.0], [3.0]])
    fake = np.array([[4.25], [6.0], [10.0], [11.0]])

    # With k = 1 the real radii are 1, 1 and 2, so the real manifold is [-1, 1] u [0, 2] u [1, 5].
    # The fake radii are 1.75, 1.75, 1 and 1, so the fake manifold is [2.5, 6] u [4.25, 7.75] u [9, 12].
    # Only 4.25 lies in the real manifold, and only 3 lies in the fake manifold.
    assert precision_recall(real, fake, k=1) == (0.25, pytest.approx(1.0 / 3.0))


def test_precision_recall_hand_computed_k1_and_k2():
    real = np.array([[-10.0], [0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[5.5], [12.0], [14.0]])

    # k = 1. Real radii 10, 1, 1, 2, 4 give the real manifold [-20, 11], which contains 5.5 only.
    # Fake radii 6.5, 2, 2 give the fake manifold [-1, 16], which contains every real point but -10.
    assert precision_recall(real, fake, k=1) == (pytest.approx(1.0 / 3.0), 0.8)

    # k = 2. Real radii 11, 3, 2, 3, 6 give [-21, 13], which now also contains 12.
    # Fake radii 8.5, 6.5, 8.5 give [-3, 22.5], which still misses -10.
    assert precision_recall(real, fake, k=2) == (pytest.approx(2.0 / 3.0), 0.8)


def test_precision_recall_ball_boundary_counts_as_inside():
    # Small integers make every distance exact. Both real radii are 2, and the fake point 4 lies at
    # distance exactly 2 from the real point 2, on the boundary of its closed ball.
    real = np.array([[0.0], [2.0]])
    fake = np.array([[4.0], [9.0]])
    precision, _ = precision_recall(real, fake, k=1)
    assert precision == 0.5


def test_precision_recall_duplicates_are_neighbours():
    # The real point 0 appears twice, so with k = 1 each copy has radius 0. The point 5 has radius 5,
    # a ball from 0 to 10, which contains 0.5 but not -2. Were the copies not neighbours of each other,
    # their radius would be 5 and -2 would be inside too.
    real = np.array([[0.0], [0.0], [5.0]])
    fake = np.array([[-2.0], [0.5], [20.0]])
    precision, _ = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(1.0 / 3.0)


def test_precision_recall_independent_of_batch_size():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((200, 6))
    fake = rng.standard_normal((150, 6)) * 1.3 + 0.2
    expected = precision_recall(real, fake, batch_size=1024)
    # Radii and cross distances are computed in blocks of rows. Batches of 7 and 149 leave a partial last block.
    for batch_size in (1, 7, 149, 200):
        assert precision_recall(real, fake, batch_size=batch_size) == expected


def test_precision_recall_accepts_torch_tensors():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((100, 4))
    fake = rng.standard_normal((100, 4)) + 0.5
    expected = precision_recall(real, fake)
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake)) == expected
    assert 0.0 < expected[0] < 1.0
    assert 0.0 < expected[1] < 1.0


@pytest.mark.parametrize(
    ("keyword_arguments", "message"),
    [
        ({"k": 0}, "k must be a positive int, got 0"),
        ({"k": 2.0}, "k must be a positive int, got 2.0"),
        ({"k": True}, "k must be a positive int, got True"),
        ({"k": 5}, r"k must be smaller than the size of each feature set, got k=5 with 6 real and 5 fake"),
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ],
)
def test_precision_recall_rejects_invalid(keyword_arguments, message):
    real = np.zeros((6, 2))
    fake = np.ones((5, 2))
    with pytest.raises(ValueError, match=message):
        precision_recall(real, fake, **keyword_arguments)


def test_precision_recall_rejects_mismatched_features():
    with pytest.raises(ValueError, match="real_features and fake_features must have the same number of features"):
        precision_recall(np.zeros((6, 2)), np.zeros((6, 3)))


# Summaries over seeds.


def test_mean_and_spread_several_values():
    summary = mean_and_spread([1.0, 2.0, 3.0, 4.0])
    assert summary.mean == 2.5
    # Squared deviations sum to 5, divided by n - 1 = 3.
    assert summary.std == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-12)
    assert summary.count == 4


def test_mean_and_spread_single_value_has_nan_std():
    mean, std, count = mean_and_spread(np.array([0.7]))
    assert mean == 0.7
    assert math.isnan(std)
    assert count == 1


def test_mean_and_spread_accepts_torch_tensor():
    assert mean_and_spread(torch.tensor([1.0, 3.0])).mean == 2.0


@pytest.mark.parametrize(("values", "message"), [([], "at least one number"), ([[1.0, 2.0]], r"1-D .* \(1, 2\)")])
def test_mean_and_spread_rejects_invalid(values, message):
    with pytest.raises(ValueError, match=message):
        mean_and_spread(values)


# Class accuracy.


def test_class_accuracy_hand_built():
    predicted = np.array([0, 1, 1, 2, 0, 2])
    requested = np.array([0, 1, 2, 2, 0, 1])

    result = class_accuracy(predicted, requested, num_classes=4)

    # Class 0: both right. Class 1: positions 1 (right) and 5 (wrong). Class 2: 2 (wrong) and 3 (right).
    # No sample requested class 3.
    assert result["accuracy"] == pytest.approx(4.0 / 6.0)
    assert result["per_class_accuracy"][:3] == [1.0, 0.5, 0.5]
    assert math.isnan(result["per_class_accuracy"][3])
    assert result["per_class_count"] == [2, 2, 2, 0]


def test_class_accuracy_accepts_torch_tensors():
    result = class_accuracy(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]), num_classes=2)
    assert result["accuracy"] == pytest.approx(2.0 / 3.0)
    assert result["per_class_accuracy"] == [0.5, 1.0]


@pytest.mark.parametrize(
    ("predicted", "requested", "num_classes", "message"),
    [
        ([0, 1], [0, 1, 1], 2, "predicted and requested must have the same length, got 2 and 3"),
        ([[0, 1]], [0, 1], 2, r"predicted must be a non-empty 1-D array .* \(1, 2\)"),
        ([], [], 2, "predicted must be a non-empty 1-D array"),
        ([0.0, 1.0], [0, 1], 2, "predicted must contain integer class ids, got dtype float64"),
        ([True, False], [0, 1], 2, "predicted must contain integer class ids, got dtype bool"),
        ([0, 1], [0, 2], 2, r"requested must contain class ids in \[0, 2\), got 2 at position 1"),
        ([0, 1], [-1, 1], 2, r"requested must contain class ids in \[0, 2\), got -1 at position 0"),
        ([0, 1], [0, 1], 0, "num_classes must be a positive int, got 0"),
    ],
)
def test_class_accuracy_rejects_invalid(predicted, requested, num_classes, message):
    with pytest.raises(ValueError, match=message):
        class_accuracy(np.asarray(predicted), np.asarray(requested), num_classes)
