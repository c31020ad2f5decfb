"""A histogram of |x| whose size never grows: a fixed number of bins over [0, upper).

Bin i covers [i·w, (i+1)·w) with w = upper / bins (the last bin also takes x = upper). The first
non-zero batch sets `upper` to its largest |x|. When a later batch reaches beyond `upper`, the range
doubles as often as needed (upper · 2^k, the smallest such power of two that covers it) and each
run of 2^k old bins is summed into one new bin: the old edges are all new edges, so re-binning
moves no count to a wrong bin. Memory: `bins` int64 counts, whatever the number of values.
Percentiles read from it (`histogram_percentile`) are exact to within one bin width; `upper` stays below
twice the largest |x| seen, so one bin is at most 2·max|x| / bins wide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 2048


@dataclass
class AbsHistogram:
    bins: int = DEFAULT_BINS
    upper: float = 0.0  # 0 until a non-zero value arrives; zeros always count into bin 0
    counts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if self.bins < 2 or self.bins & (self.bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {self.bins}")
        self.counts = np.zeros(self.bins, np.int64)

    @property
    def width(self) -> float:
        return self.upper / self.bins

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def centers(self) -> np.ndarray:
        return (np.arange(self.bins, dtype=np.float64) + 0.5) * self.width

    def add(self, values: np.ndarray) -> None:
        magnitudes = np.abs(np.asarray(values, dtype=np.float64)).ravel()
        if magnitudes.size == 0:
            return
        peak = float(magnitudes.max())
        if peak > self.upper:
            self._grow(peak)
        if self.upper == 0.0:  # only zeros so far
            self.counts[0] += magnitudes.size
            return
        index = np.minimum((magnitudes * (self.bins / self.upper)).astype(np.int64), self.bins - 1)
        self.counts += np.bincount(index, minlength=self.bins)

    def _grow(self, peak: float) -> None:
        if self.upper == 0.0:
            self.upper = peak
            return
        factor = 2 ** max(int(np.ceil(np.log2(peak / self.upper))), 1)
        while self.upper * factor < peak:  # log2 rounding
            factor *= 2
        self.counts = merge_bins(self.counts, factor)
        self.upper *= factor

    def percentile(self, percent: float) -> float:
        """The `percent` % point of |x| (np.percentile's rule, to within one bin width)."""
        return histogram_percentile(self.counts, self.upper, percent)


def merge_bins(counts: np.ndarray, factor: int) -> np.ndarray:
    """Counts after widening every bin `factor` times (a power of two): runs of `factor` bins summed."""
    bins = counts.size
    merged = np.zeros_like(counts)
    if factor >= bins:
        merged[0] = counts.sum()
    else:
        merged[: bins // factor] = counts.reshape(bins // factor, factor).sum(axis=1)
    return merged


def histogram_percentile(counts: np.ndarray, upper: float, percent: float) -> float:
    """np.percentile's default ("linear") rule on the histogram: rank r = percent/100 · (n − 1) among the sorted
    values, the result (1 − f)·v[k] + f·v[k+1] with k = floor(r), f = r − k. Each v[k] is estimated inside its bin
    (spread evenly over the bin), so the estimate is off by less than one bin width."""
    total = int(counts.sum())
    if total == 0 or upper == 0.0:
        return 0.0
    cumulative = np.cumsum(counts)
    width = upper / counts.size

    def order_statistic(k: int) -> float:
        i = int(np.searchsorted(cumulative, k, side="right"))  # the bin holding the k-th smallest (from 0)
        before = int(cumulative[i - 1]) if i else 0
        return (i + (k - before + 0.5) / counts[i]) * width

    rank = percent / 100.0 * (total - 1)
    k = int(np.floor(rank))
    fraction = rank - k
    low = order_statistic(k)
    return float(low if fraction == 0.0 else low + fraction * (order_statistic(min(k + 1, total - 1)) - low))
