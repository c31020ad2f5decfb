"""Observers: running statistics of one site's activation rows, in memory that does not grow with the data.

Each observer takes batches of rows x [tokens, features] (`update`) and gives its statistic (`result`):

| name | result | state |
|---|---|---|
| `minmax` | `ValueRange(min, max)` over all values | two floats |
| `absmax` | max |x| (float) | one float |
| `absmax_per_channel` | max over rows of |x| per input feature, float32 [features] | [features] |
| `percentile` | the `percentile` % point of |x| (float), from an `AbsHistogram` | `bins` counts |
| `mse` | clip c = absmax · r (r in `ratios`) of least Σ (x − q(x))² for the element type (float) | `bins` counts |
| `mean_abs_per_channel` | mean over rows of |x| per input feature (AWQ's statistic), float64 [features] | [features] |
| `hessian` | GPTQ's H = 2/n Σ xᵀx over all n rows, float64 [features, features] | [features, features] and 256 rows |

Adding one is a class with `update`/`result` and `@register_observer("name")`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.converter.calibration.fake_quant import ELEMENT_TYPES, best_clip
from lowbit.converter.calibration.histogram import DEFAULT_BINS, AbsHistogram
from lowbit.errors import LowbitError

OBSERVERS: dict[str, type[Observer]] = {}

# clip ratios the `mse` observer tries: 1.00, 0.99, ..., 0.20 of the largest |x|
MSE_RATIOS = tuple(round(1.0 - i / 100, 2) for i in range(81))


def register_observer(name: str):
    def register(cls):
        cls.name = name
        OBSERVERS[name] = cls
        return cls

    return register


class Observer:
    name = ""
    features: int | None = None

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError

    def _rows(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"{self.name}: expected rows [tokens, features], got shape {x.shape}")
        if self.features is None:
            self.features = x.shape[1]
        elif x.shape[1] != self.features:
            raise ValueError(f"{self.name}: rows of {x.shape[1]} features after rows of {self.features}")
        return x


@dataclass(frozen=True)
class ValueRange:
    min: float
    max: float


@register_observer("minmax")
class MinMaxObserver(Observer):
    def __init__(self):
        self.min, self.max = np.inf, -np.inf

    def update(self, x):
        x = self._rows(x)
        if x.size:
            self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    def result(self) -> ValueRange:
        return ValueRange(self.min, self.max)


@register_observer("absmax")
class AbsMaxObserver(Observer):
    def __init__(self):
        self.absmax = 0.0

    def update(self, x):
        x = self._rows(x)
        if x.size:
            self.absmax = max(self.absmax, float(np.abs(x).max()))

    def result(self) -> float:
        return self.absmax


@register_observer("absmax_per_channel")
class AbsMaxPerChannelObserver(Observer):
    def __init__(self):
        self.absmax: np.ndarray | None = None

    def update(self, x):
        x = self._rows(x)
        if self.absmax is None:
            self.absmax = np.zeros(x.shape[1], np.float32)
        if x.shape[0]:
            np.maximum(self.absmax, np.abs(x).max(axis=0), out=self.absmax)

    def result(self) -> np.ndarray:
        return self.absmax.copy()


@register_observer("mean_abs_per_channel")
class MeanAbsPerChannelObserver(Observer):
    """Σ |x| per feature in float64 and the row count n; the result is the sum / n (AWQ's mean |x|)."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.rows = 0

    def update(self, x):
        x = self._rows(x)
        if self.total is None:
            self.total = np.zeros(x.shape[1], np.float64)
        self.total += np.abs(x).sum(axis=0, dtype=np.float64)
        self.rows += x.shape[0]

    def result(self) -> np.ndarray:
        return self.total / max(self.rows, 1)


@register_observer("percentile")
class PercentileObserver(Observer):
    def __init__(self, percentile: float = 99.99, bins: int = DEFAULT_BINS):
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be within (0, 100], got {percentile}")
        self.percentile = percentile
        self.histogram = AbsHistogram(bins)

    def update(self, x):
        self.histogram.add(self._rows(x))

    def result(self) -> float:
        return self.histogram.percentile(self.percentile)


@register_observer("mse")
class MseObserver(Observer):
    """Each bin stands for its values at its centre, so the search costs bins × len(ratios), not the data size."""

    def __init__(self, element_type: str = "int8", ratios: tuple[float, ...] = MSE_RATIOS, bins: int = DEFAULT_BINS):
        if element_type not in ELEMENT_TYPES:
            raise ValueError(f"unknown element_type '{element_type}' (known: {', '.join(ELEMENT_TYPES)})")
        if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"ratios must lie within (0, 1], got {ratios}")
        self.element = ELEMENT_TYPES[element_type]
        self.ratios = tuple(ratios)
        self.histogram = AbsHistogram(bins)
        self.absmax = 0.0

    def update(self, x):
        x = self._rows(x)
        if x.size:
            self.absmax = max(self.absmax, float(np.abs(x).max()))
            self.histogram.add(x)

    def result(self) -> float:
        h = self.histogram
        return best_clip(h.centers(), h.counts.astype(np.float64), self.absmax, self.ratios, self.element)


@register_observer("hessian")
class HessianObserver(Observer):
    """H = 2/n Σ xᵀx in float64, as GPTQ accumulates it (n counts rows). Rows wait in a buffer of `PENDING_ROWS`
    until it is full, then one float64 product adds them to the sum Σ xᵀx, which `result` scales by 2/n: a running
    mean updated per sample costs several K × K passes for one sample's few rows, more than the product itself."""

    PENDING_ROWS = 2048  # float64 syrk: 256-row blocks ran at half the speed of 2048 (K = 576 and 1536)

    def __init__(self):
        self.sum: np.ndarray | None = None  # Σ xᵀx over the rows added so far, float64 [features, features]
        self.pending: np.ndarray | None = None  # rows not yet in it, [PENDING_ROWS, features], float32 or wider
        self.filled = 0
        self.rows = 0

    def update(self, x):
        x = self._rows(x)
        if self.sum is None:
            self.sum = np.zeros((x.shape[1], x.shape[1]), np.float64)
            # float32 rows (captures) wait as float32; wider input keeps its precision
            self.pending = np.empty((self.PENDING_ROWS, x.shape[1]), np.promote_types(x.dtype, np.float32))
        self.rows += x.shape[0]
        while x.shape[0]:
            take = min(x.shape[0], self.PENDING_ROWS - self.filled)
            self.pending[self.filled : self.filled + take] = x[:take]
            self.filled += take
            x = x[take:]
            if self.filled == self.PENDING_ROWS:
                self._add_pending()

    def _add_pending(self):
        rows = self.pending[: self.filled].astype(np.float64)
        self.sum += rows.T @ rows  # the same array on both sides: numpy calls syrk
        self.filled = 0

    def result(self) -> np.ndarray:
        if self.filled:
            self._add_pending()
        return self.sum * (2.0 / self.rows) if self.rows else self.sum.copy()


@dataclass(frozen=True)
class ObserverSpec:
    """An observer by registry name, with its constructor options."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    def create(self) -> Observer:
        return OBSERVERS[self.name](**dict(self.options))


def make_observer(name: str, **options) -> Observer:
    if name not in OBSERVERS:
        raise LowbitError(f"unknown observer '{name}' (known: {', '.join(OBSERVERS)})")
    try:
        return OBSERVERS[name](**options)
    except (TypeError, ValueError) as e:
        raise LowbitError(f"observer '{name}': {e}") from None


def parse_observers(observers: list[str] | tuple[str, ...] | dict[str, dict]) -> tuple[ObserverSpec, ...]:
    """Observer names, or {name: options}, checked once (unknown names and bad options raise LowbitError)."""
    items = observers.items() if isinstance(observers, dict) else ((name, {}) for name in observers)
    specs = []
    for name, options in items:
        if not isinstance(options, dict):
            raise LowbitError(f"observer '{name}': options must be a dict, got {type(options).__name__}")
        make_observer(name, **options)  # validates
        specs.append(ObserverSpec(name, tuple(options.items())))
    if not specs:
        raise LowbitError("no observers given (known: " + ", ".join(OBSERVERS) + ")")
    return tuple(specs)
