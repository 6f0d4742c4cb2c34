"""Metrics for generated samples: Fréchet distance, precision and recall, class accuracy.

Every function takes plain arrays: features of shape (num_samples, num_features) as a numpy array,
anything `np.asarray` accepts, or a torch tensor on any device. Nothing here runs a model, so the
metrics can be tested on synthetic data with known expected values. Computation is in float64 with numpy.

Features from this project's small classifier give a *classifier* Fréchet distance. Its values are
not comparable with FID computed on Inception-v3 features, and a report must say so.
"""

from typing import NamedTuple

import numpy as np

# Relative tolerance for the symmetry and positive semi-definiteness checks of a covariance matrix.
# It admits the rounding of covariances computed in float32, but not a matrix that is not a covariance.
COVARIANCE_RTOL = 1e-5


class MeanAndSpread(NamedTuple):
    """Mean, sample standard deviation (ddof=1) and count of a metric measured over several seeds."""

    mean: float
    std: float
    count: int


def fit_gaussian(features) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean and the sample covariance (ddof=1) of features of shape (num_samples, num_features).

    Computing these once for the reference set saves work when many generated sets are scored against it.
    """
    features = _as_feature_matrix(features, "features")
    mean = features.mean(axis=0)
    covariance = np.cov(features, rowvar=False, ddof=1).reshape(features.shape[1], features.shape[1])
    return mean, covariance


def gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """Compute the squared Fréchet distance between the Gaussians N(mu_a, cov_a) and N(mu_b, cov_b).

    The closed form of Dowson and Landau (1982) is

        ||mu_a - mu_b||^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a^(1/2) cov_b cov_a^(1/2))^(1/2)).

    The matrix inside the last trace is symmetric, so both square roots come from `eigh`, with
    eigenvalues below the rounding level set to zero. The result is real and finite for singular
    covariances too. There `scipy.linalg.sqrtm(cov_a @ cov_b)` returns a complex matrix (seen with
    scipy 1.17.1 for rank-9 covariances in 64 dimensions).

    Raises:
        ValueError: if a mean is not 1-D, a covariance is not square, symmetric and positive
            semi-definite, or the dimensions differ. The message names the argument.
    """
    mu_a = _as_mean_vector(mu_a, "mu_a")
    mu_b = _as_mean_vector(mu_b, "mu_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"mu_a and mu_b must have the same length, got {mu_a.shape[0]} and {mu_b.shape[0]}.")
    dimension = mu_a.shape[0]
    cov_a = _as_covariance(cov_a, "cov_a", dimension)
    cov_b = _as_covariance(cov_b, "cov_b", dimension)

    sqrt_cov_a = _symmetric_sqrt(cov_a)
    middle = sqrt_cov_a @ cov_b @ sqrt_cov_a
    middle_eigenvalues = _drop_rounding_noise(np.linalg.eigvalsh((middle + middle.T) / 2))
    trace_of_sqrt = np.sqrt(middle_eigenvalues).sum()

    mean_term = float(np.sum((mu_a - mu_b) ** 2))
    covariance_term = float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_of_sqrt)
    # The exact value is non-negative. A negative result can only come from rounding, when the
    # two Gaussians are equal or nearly so.
    return max(mean_term + covariance_term, 0.0)


def frechet_distance(features_a, features_b) -> float:
    """Compute the squared Fréchet distance between Gaussians fitted to two feature sets.

    Each set is summarised by its mean and sample covariance (ddof=1), as in FID. The sets may have
    different sizes but must have the same number of features. Fewer samples than features give a
    singular covariance, and the result is still finite, but the estimate is then dominated by
    sampling noise: its expected value for two samples of one Gaussian grows roughly like D^2 / N.

    Raises:
        ValueError: if a set is not 2-D, has fewer than 2 rows or contains NaN or infinity, or the
            sets differ in the number of features. The message names the argument.
    """
    features_a = _as_feature_matrix(features_a, "features_a")
    features_b = _as_feature_matrix(features_b, "features_b")
    _check_same_num_features(features_a, "features_a", features_b, "features_b")

    mu_a, cov_a = fit_gaussian(features_a)
    mu_b, cov_b = fit_gaussian(features_b)
    return gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Estimate precision and recall of generated samples with k-nearest-neighbour manifolds.

    This is the estimate of Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing
    Generative Models" (NeurIPS 2019, arXiv:1904.06991). Each set's manifold is the union of closed
    balls around its points. A point's radius is the Euclidean distance to its k-th nearest
    neighbour within its own set, the point itself excluded (a duplicate of it counts as a
    neighbour). Precision is the share of fake points inside the real manifold, a measure of
    fidelity. Recall is the share of real points inside the fake manifold, a measure of coverage.
    A fake set that collapsed onto some modes of the real set keeps a high precision but loses
    recall.

    Args:
        real_features: features of real samples, shape (num_real, num_features).
        fake_features: features of generated samples, shape (num_fake, num_features).
        k: neighbour rank that sets the radii, 1 <= k < the size of each set. The paper uses 3.
        batch_size: rows of pairwise distances computed at once. Each block contains at most
            batch_size * max(num_real, num_fake) float64 values, 80 MB for 1,024 x 10,000.

    Returns:
        `(precision, recall)`, each in [0, 1].

    Raises:
        ValueError: on invalid features (as in `frechet_distance`), `k` or `batch_size`.
    """
    real = _as_feature_matrix(real_features, "real_features")
    fake = _as_feature_matrix(fake_features, "fake_features")
    _check_same_num_features(real, "real_features", fake, "fake_features")
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(k, "k")
    smaller_size = min(real.shape[0], fake.shape[0])
    if k >= smaller_size:
        raise ValueError(
            f"k must be smaller than the size of each feature set, got k={k} with {real.shape[0]} real "
            f"and {fake.shape[0]} fake samples. Use k <= {smaller_size - 1} or pass more samples."
        )

    # Distances do not change under a shared translation. Centring both sets near the origin
    # reduces the cancellation in |x|^2 + |y|^2 - 2 x.y when the features have a large common offset.
    center = real.mean(axis=0)
    real = real - center
    fake = fake - center

    real_radii_squared = _kth_neighbour_squared_distances(real, k, batch_size)
    fake_radii_squared = _kth_neighbour_squared_distances(fake, k, batch_size)
    fake_in_real_manifold = np.zeros(fake.shape[0], dtype=bool)
    real_in_fake_manifold = np.zeros(real.shape[0], dtype=bool)
    real_squared_norms = np.einsum("ij,ij->i", real, real)

    # One pass over the fake-to-real distances serves both estimates. A row shows whether that fake
    # point lies in some real ball, and a column shows whether that real point lies in some fake ball.
    for start in range(0, fake.shape[0], batch_size):
        stop = min(start + batch_size, fake.shape[0])
        distances_squared = _squared_distances(fake[start:stop], real, real_squared_norms)
        fake_in_real_manifold[start:stop] = (distances_squared <= real_radii_squared[None, :]).any(axis=1)
        real_in_fake_manifold |= (distances_squared <= fake_radii_squared[start:stop, None]).any(axis=0)

    return float(fake_in_real_manifold.mean()), float(real_in_fake_manifold.mean())


def mean_and_spread(values) -> MeanAndSpread:
    """Summarise a metric measured over several seeds as mean, sample standard deviation and count.

    The standard deviation uses ddof=1. With a single value it is undefined and returned as NaN,
    so that a table cannot show a spread of 0 for an unrepeated measurement. NaN values propagate
    into mean and std.

    Raises:
        ValueError: if `values` is empty or not 1-D.
    """
    values = np.asarray(_to_numpy(values), dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(
            f"values must be a 1-D sequence of numbers, one per seed, got an array of shape {values.shape}."
        )
    if values.size == 0:
        raise ValueError("values must contain at least one number, got an empty sequence.")
    std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return MeanAndSpread(mean=float(values.mean()), std=std, count=int(values.size))


def class_accuracy(predicted, requested, num_classes: int) -> dict:
    """Compute the share of samples whose predicted class is the requested class, overall and per class.

    Args:
        predicted: class ids that a classifier assigned to the samples, 1-D integers in [0, num_classes).
        requested: class ids that the samples were generated for, same length and range.
        num_classes: number of classes.

    Returns:
        A dict with
        - "accuracy": float, the share over all samples. For a class-balanced batch it equals the
          mean of the per-class accuracies.
        - "per_class_accuracy": list of num_classes floats indexed by requested class id. A class
          that no sample requested gets NaN, so that rows for different runs keep the same columns.
        - "per_class_count": list of num_classes ints, the number of samples that requested each class.

    Raises:
        ValueError: if an input is not a non-empty 1-D integer array, the lengths differ, a class id
            is out of range, or `num_classes` is not a positive int. The message names the argument.
    """
    _check_positive_int(num_classes, "num_classes")
    predicted = _as_class_ids(predicted, "predicted", num_classes)
    requested = _as_class_ids(requested, "requested", num_classes)
    if predicted.shape != requested.shape:
        raise ValueError(
            f"predicted and requested must have the same length, got {predicted.shape[0]} and {requested.shape[0]}."
        )

    correct = predicted == requested
    per_class_count = np.bincount(requested, minlength=num_classes)
    per_class_correct = np.bincount(requested, weights=correct, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class_accuracy = np.where(per_class_count > 0, per_class_correct / per_class_count, np.nan)

    return {
        "accuracy": float(correct.mean()),
        "per_class_accuracy": [float(value) for value in per_class_accuracy],
        "per_class_count": [int(value) for value in per_class_count],
    }


def _to_numpy(value):
    # Duck-typed so that torch stays optional. float64 first, because numpy has no bfloat16.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.double()
        return value.numpy()
    return value


def _as_feature_matrix(features, name: str) -> np.ndarray:
    array = np.asarray(_to_numpy(features), dtype=np.float64)
    if array.ndim != 2:
        hint = f" Reshape 1-D features with {name}.reshape(-1, 1)." if array.ndim == 1 else ""
        raise ValueError(
            f"{name} must be a 2-D array of shape (num_samples, num_features), got shape {array.shape}.{hint}"
        )
    if array.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 rows (samples), got {array.shape[0]}.")
    if array.shape[1] < 1:
        raise ValueError(f"{name} must have at least 1 column (feature), got shape {array.shape}.")
    if not np.isfinite(array).all():
        bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(
            f"{name} must contain only finite values, got NaN or infinity in {bad_rows.size} rows, "
            f"the first at row {bad_rows[0]}."
        )
    return array


def _check_same_num_features(first: np.ndarray, first_name: str, second: np.ndarray, second_name: str) -> None:
    if first.shape[1] != second.shape[1]:
        raise ValueError(
            f"{first_name} and {second_name} must have the same number of features (columns), "
            f"got shapes {first.shape} and {second.shape}."
        )


def _check_positive_int(value, name: str) -> None:
    # bool is a subclass of int, but True as a count is a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _as_mean_vector(mean, name: str) -> np.ndarray:
    array = np.asarray(_to_numpy(mean), dtype=np.float64)
    if array.ndim != 1 or array.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array (a mean vector), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must contain only finite values, got NaN or infinity.")
    return array


def _as_covariance(covariance, name: str, dimension: int) -> np.ndarray:
    array = np.asarray(_to_numpy(covariance), dtype=np.float64)
    if array.shape != (dimension, dimension):
        raise ValueError(
            f"{name} must have shape ({dimension}, {dimension}) to match the means, got shape {array.shape}."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must contain only finite values, got NaN or infinity.")

    scale = np.abs(array).max()
    asymmetry = np.abs(array - array.T).max()
    if asymmetry > COVARIANCE_RTOL * scale:
        raise ValueError(
            f"{name} must be symmetric, got a largest |{name} - {name}.T| of {asymmetry:.3g} "
            f"for entries up to {scale:.3g}."
        )
    array = (array + array.T) / 2

    smallest_eigenvalue = np.linalg.eigvalsh(array)[0]
    if smallest_eigenvalue < -COVARIANCE_RTOL * scale:
        raise ValueError(
            f"{name} must be positive semi-definite, got an eigenvalue of {smallest_eigenvalue:.3g} "
            f"for entries up to {scale:.3g}."
        )
    return array


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    sqrt_eigenvalues = np.sqrt(_drop_rounding_noise(eigenvalues))
    return (eigenvectors * sqrt_eigenvalues) @ eigenvectors.T


def _drop_rounding_noise(eigenvalues: np.ndarray) -> np.ndarray:
    """Set to zero the eigenvalues of a PSD matrix that are below its rounding level, negative ones included.

    `eigh` computes each eigenvalue to within about size * eps * largest eigenvalue. Below that an
    eigenvalue of a singular covariance is noise. Its square root, up to sqrt(size * eps) times
    the largest one's square root, would add a spurious amount to the trace for every missing rank.
    """
    noise_level = eigenvalues.size * np.finfo(np.float64).eps * max(eigenvalues.max(), 0.0)
    return np.where(eigenvalues > noise_level, eigenvalues, 0.0)


def _squared_distances(rows: np.ndarray, points: np.ndarray, points_squared_norms: np.ndarray) -> np.ndarray:
    # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y, built in place so that a block needs one buffer.
    distances_squared = rows @ points.T
    distances_squared *= -2.0
    distances_squared += np.einsum("ij,ij->i", rows, rows)[:, None]
    distances_squared += points_squared_norms[None, :]
    # Rounding can make the distance between two equal points slightly negative.
    return np.maximum(distances_squared, 0.0, out=distances_squared)


def _kth_neighbour_squared_distances(points: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Return the squared distance from each point to its k-th nearest other point of the same set."""
    num_points = points.shape[0]
    squared_norms = np.einsum("ij,ij->i", points, points)
    radii_squared = np.empty(num_points)
    for start in range(0, num_points, batch_size):
        stop = min(start + batch_size, num_points)
        distances_squared = _squared_distances(points[start:stop], points, squared_norms)
        # Exclude each point itself by index, not by a zero distance, so that duplicates still count.
        distances_squared[np.arange(stop - start), np.arange(start, stop)] = np.inf
        distances_squared.partition(k - 1, axis=1)
        radii_squared[start:stop] = distances_squared[:, k - 1]
    return radii_squared


def _as_class_ids(class_ids, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(_to_numpy(class_ids))
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of class ids, got shape {array.shape}.")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must contain integer class ids, got dtype {array.dtype}. "
            f"Convert scores to ids first, for example with logits.argmax(axis=1)."
        )
    out_of_range = (array < 0) | (array >= num_classes)
    if out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(
            f"{name} must contain class ids in [0, {num_classes}), got {array[first]} at position {first}."
        )
    return array.astype(np.int64)
