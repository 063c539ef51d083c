"""Technical batches of donors and per-batch feature statistics, computed out of core.

A donor's *batch* is the combination of its values in the ``--batch-key`` columns (e.g.
``dataset_id``, ``assay``), labelled ``"site-0"`` or, for several columns, ``"site-0|10x 3'
v3"``. Batch codes are positions in the sorted list of labels.

Ingest accumulates the mean and the population standard deviation of every feature over
all cells of each batch while it writes the rows, bucket by bucket, without holding the
cells: each slice of rows gives per-batch counts, means and sums of squared deviations
(M2), which are merged into the running totals with the parallel-variance update of Chan,
Golub and LeVeque (1979), in float64. Memory grows with batches times features, never with
cells, and the result does not depend on how the rows are sliced (up to float64 rounding).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sampleclr_scale.errors import InputError

BATCH_SEPARATOR = "|"
MIN_STD = 1e-6
"""A standard deviation below this (a constant feature) is stored as 1.0."""
_SLICE_ROWS = 65_536  # rows converted to float64 at a time


def batch_codes(donors: pd.DataFrame, key: list[str]) -> tuple[np.ndarray, list[str]]:
    """The batch of each donor and the batch labels.

    Parameters
    ----------
    donors
        Donor table holding the ``key`` columns.
    key
        The batch-key columns.

    Returns
    -------
    codes, labels
        Int32 ``[n_donors]`` codes into ``labels``, the sorted distinct labels (the
        columns' values joined by ``|``).
    """
    labels = np.array([BATCH_SEPARATOR.join(map(str, values))
                       for values in donors[key].itertuples(index=False)], dtype=str)
    distinct, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int32).reshape(-1), distinct.tolist()


def group_moments(
    rows: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and M2 (sum of squared deviations) of ``rows`` per code, in float64.

    Parameters
    ----------
    rows
        ``[n, d]`` feature rows (any float type), ``n >= 1``.
    codes
        Int ``[n]`` batch code of each row.

    Returns
    -------
    batches, count, mean, m2
        The distinct codes (sorted), their int64 row counts, and float64 ``[k, d]`` means
        and M2.
    """
    order = np.argsort(codes, kind="stable")
    x = rows[order].astype(np.float64)
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    count = np.diff(np.r_[starts, len(x)]).astype(np.int64)
    mean = np.add.reduceat(x, starts, axis=0) / count[:, None]
    deviation = x - np.repeat(mean, count, axis=0)
    m2 = np.add.reduceat(deviation * deviation, starts, axis=0)
    return sorted_codes[starts], count, mean, m2


class BatchMoments:
    """Running per-batch count, mean and M2 of feature rows, merged stably (Chan et al.).

    Parameters
    ----------
    n_batches
        Number of batch codes.
    dim
        Width of the feature rows.
    """

    def __init__(self, n_batches: int, dim: int) -> None:
        self.count = np.zeros(n_batches, dtype=np.int64)
        self.mean = np.zeros((n_batches, dim), dtype=np.float64)
        self.m2 = np.zeros((n_batches, dim), dtype=np.float64)

    def add(self, rows: np.ndarray, codes: np.ndarray) -> None:
        """Merge ``[n, d]`` rows with batch ``codes[n]``, a slice of rows at a time."""
        for lo in range(0, len(rows), _SLICE_ROWS):
            hi = lo + _SLICE_ROWS
            self.merge(*group_moments(rows[lo:hi], codes[lo:hi]))

    def merge(self, batches: np.ndarray, count: np.ndarray, mean: np.ndarray,
              m2: np.ndarray) -> None:
        """Merge the moments of distinct ``batches`` into the running totals.

        ``delta = mean_b - mean_a``; ``mean += delta n_b / n``;
        ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``.
        """
        n_a = self.count[batches]
        n = n_a + count
        delta = mean - self.mean[batches]
        weight = (count / n)[:, None]
        self.mean[batches] += delta * weight
        self.m2[batches] += m2 + delta * delta * (n_a[:, None] * weight)
        self.count[batches] = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Float32 ``[n_batches, d]`` mean and population std (ddof=0); a std below
        :data:`MIN_STD` is 1.0. A batch without rows has mean 0 and std 1."""
        variance = self.m2 / np.maximum(self.count, 1)[:, None]
        std = np.sqrt(np.maximum(variance, 0.0))
        std[std < MIN_STD] = 1.0
        return self.mean.astype(np.float32), std.astype(np.float32)


class CohortBatches:
    """The batches of a cohort's donors and their feature moments, filled during ingest.

    Parameters
    ----------
    donors
        The cohort's donor table (before any donor is dropped for non-finite features).
    key
        The batch-key columns.
    dim
        Width of the feature rows.
    """

    def __init__(self, donors: pd.DataFrame, key: list[str], dim: int) -> None:
        self.key = list(key)
        self.codes, self.labels = batch_codes(donors, self.key)
        self.moments = BatchMoments(len(self.labels), dim)

    def add(self, rows: np.ndarray, donor: np.ndarray) -> None:
        """Merge written feature rows of cohort donors ``donor`` (positions, one per row)."""
        self.moments.add(rows, self.codes[donor])

    def finish(
        self, donors: pd.DataFrame
    ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        """Codes, labels and statistics over the donors that were written.

        Parameters
        ----------
        donors
            Donor table of the written donors (a subset of the cohort's, in order).

        Returns
        -------
        codes, labels, mean, std
            Int32 ``[n_donors]`` batch codes, the labels of the batches that kept donors,
            and float32 ``[n_batches, d]`` mean and std of those batches.
        """
        codes, labels = batch_codes(donors, self.key)
        position = {label: i for i, label in enumerate(self.labels)}
        index = np.array([position[label] for label in labels], dtype=np.int64)
        mean, std = self.moments.result()
        return codes, labels, mean[index], std[index]


def standardize(rows: np.ndarray, mean: np.ndarray, std: np.ndarray,
                donor_batch: np.ndarray | int) -> np.ndarray:
    """``(rows - mean[b]) / std[b]`` in float32.

    Parameters
    ----------
    rows
        ``[..., d]`` feature rows.
    mean, std
        Float32 ``[n_batches, d]`` per-batch statistics.
    donor_batch
        Batch code(s): an int, or an int array over the leading axes of ``rows``. An array
        with fewer axes than ``rows.shape[:-1]`` is aligned to the *first* axes (a ``[B]``
        array of donor batches for ``[B, m, d]`` bags), then broadcast.

    Raises
    ------
    InputError
        For a code that is not an integer in ``0..n_batches-1``, or codes whose shape does
        not broadcast against the leading axes of ``rows``.
    """
    x = np.asarray(rows, dtype=np.float32)
    batch = np.asarray(donor_batch)
    lead = x.shape[:-1]
    if batch.size and not np.issubdtype(batch.dtype, np.integer):
        raise InputError(f"batch codes must be integers, got {batch.dtype}",
                         "pass codes from BagStore.donor_batch")
    if batch.size and (batch.min() < 0 or batch.max() >= len(mean)):
        raise InputError(f"batch codes must be in 0..{len(mean) - 1}, got "
                         f"{batch.min()}..{batch.max()}",
                         "pass codes from BagStore.donor_batch")
    if batch.ndim > len(lead):
        raise InputError(f"batch codes of shape {batch.shape} do not fit rows of shape "
                         f"{x.shape}", "pass one code per leading row index, or an int")
    batch = batch.reshape(batch.shape + (1,) * (len(lead) - batch.ndim)).astype(np.intp)
    try:
        np.broadcast_shapes(batch.shape, lead)
    except ValueError:
        raise InputError(f"batch codes of shape {np.shape(donor_batch)} do not broadcast "
                         f"against rows of shape {x.shape}",
                         "pass one code per leading row index, or an int") from None
    return (x - mean[batch]) / std[batch]
