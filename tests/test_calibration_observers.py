"""Observers against plain numpy on all the data at once, fed in chunks; the histogram they share."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.converter.calibration import ELEMENT_TYPES, OBSERVERS, AbsHistogram, fake_quantize, make_observer
from lowbit.converter.calibration.observers import MSE_RATIOS, parse_observers
from lowbit.errors import LowbitError

FEATURES = 24


def chunks(rng, count=5, scale=1.0):
    """Activation-like rows: normal values with a few heavy outliers, chunks of varying length."""
    out = []
    for _ in range(count):
        x = rng.standard_normal((int(rng.integers(30, 300)), FEATURES)).astype(np.float32) * scale
        x[rng.random(x.shape) < 0.002] *= 20
        out.append(x)
    return out


def fed(name, data, **options):
    observer = make_observer(name, **options)
    for x in data:
        observer.update(x)
    return observer.result()


def test_minmax_absmax_per_channel_exact(rng):
    data = chunks(rng)
    everything = np.concatenate(data)
    lo_hi = fed("minmax", data)
    assert (lo_hi.min, lo_hi.max) == (everything.min(), everything.max())
    assert fed("absmax", data) == np.abs(everything).max()
    per_channel = fed("absmax_per_channel", data)
    assert per_channel.shape == (FEATURES,) and per_channel.dtype == np.float32
    np.testing.assert_array_equal(per_channel, np.abs(everything).max(axis=0))


def test_mean_abs_per_channel_is_awq_mean_in_float64(rng):
    data = chunks(rng, scale=3.0)
    everything = np.concatenate(data).astype(np.float64)
    means = fed("mean_abs_per_channel", data)
    assert means.shape == (FEATURES,) and means.dtype == np.float64
    np.testing.assert_allclose(means, np.abs(everything).mean(axis=0), rtol=1e-12, atol=0)


def test_hessian_is_gptq_mean_in_float64(rng):
    data = chunks(rng)
    x = np.concatenate(data).astype(np.float64)
    h = fed("hessian", data)
    assert h.shape == (FEATURES, FEATURES) and h.dtype == np.float64
    np.testing.assert_allclose(h, 2.0 / x.shape[0] * x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("percent", [50.0, 99.0, 99.99])
def test_percentile_within_one_bin(percent, rng):
    # growing scales force the histogram to re-bin several times
    data = [x * s for x, s in zip(chunks(rng), [0.1, 1.0, 0.5, 7.0, 30.0])]
    magnitudes = np.abs(np.concatenate(data))
    observer = make_observer("percentile", percentile=percent)
    for x in data:
        observer.update(x)
    assert observer.histogram.upper < 2 * magnitudes.max()
    assert abs(observer.result() - np.percentile(magnitudes, percent)) <= observer.histogram.width


def test_histogram_rebinning_keeps_counts_in_their_bins(rng):
    small, large = rng.random(1000) * 0.3, rng.random(1000) * 5.0
    h = AbsHistogram(bins=64)
    h.add(small)
    h.add(large)
    direct = np.histogram(np.abs(np.concatenate([small, large])), bins=64, range=(0, h.upper))[0]
    assert h.upper == pytest.approx(small.max() * 32)  # 0.3 -> 5.0 needs 2^5
    assert h.total == 2000
    # values right on an edge may land in either neighbour through float rounding; nowhere else
    assert np.abs(np.cumsum(h.counts) - np.cumsum(direct)).max() <= 2


def test_histogram_zeros_then_values():
    h = AbsHistogram(bins=8)
    h.add(np.zeros(5))
    h.add(np.array([1.0, -2.0]))
    assert h.upper == 2.0 and h.counts[0] == 5 and h.counts[4] == 1 and h.counts[7] == 1


def histogram_brute_force(observer) -> float:
    """The mse search done by hand: every histogram value repeated, each clip tried, the first least error wins."""
    h = observer.histogram
    values = np.repeat(h.centers(), h.counts)
    errors = [np.mean((values - fake_quantize(values, observer.absmax * r, observer.element)) ** 2)
              for r in observer.ratios]
    return observer.absmax * observer.ratios[int(np.argmin(errors))]


@pytest.mark.parametrize("element_type", ["int8", "int4", "fp8_e4m3"])
def test_mse_clip_matches_brute_force(element_type, rng):
    data = chunks(rng, scale=3.0)
    observer = make_observer("mse", element_type=element_type)
    for x in data:
        observer.update(x)
    clip = observer.result()
    assert clip == pytest.approx(histogram_brute_force(observer), rel=1e-12)

    values = np.concatenate(data).astype(np.float64).ravel()
    element = ELEMENT_TYPES[element_type]
    raw_errors = {r: np.mean((values - fake_quantize(values, observer.absmax * r, element)) ** 2) for r in MSE_RATIOS}
    best = min(raw_errors.values())
    chosen = np.mean((values - fake_quantize(values, clip, element)) ** 2)
    assert chosen <= best * 1.05  # the histogram's choice is (nearly) as good as the search on the raw values
    if element_type == "int4":  # with outliers, 4 bits should clip
        assert clip < observer.absmax


def test_fake_quantize_grids():
    values = np.array([-3.0, -1.2, 0.0, 0.26, 1.1, 2.0, 9.0])
    np.testing.assert_array_equal(fake_quantize(values, 2.0, ELEMENT_TYPES["int2"]), [-2, -2, 0, 0, 2, 2, 2])
    np.testing.assert_allclose(fake_quantize(values, 127.0, ELEMENT_TYPES["int8"]), [-3, -1, 0, 0, 1, 2, 9])
    fp8 = fake_quantize(np.array([448.0, 500.0, 0.3]), 448.0, ELEMENT_TYPES["fp8_e4m3"])
    np.testing.assert_array_equal(fp8, [448.0, 448.0, np.float32(0.3).astype("float8_e4m3fn").astype(np.float64)])


def state_bytes(observer) -> int:
    arrays = [v for v in vars(observer).values() if isinstance(v, np.ndarray)]
    arrays += [v.counts for v in vars(observer).values() if isinstance(v, AbsHistogram)]
    return sum(a.nbytes for a in arrays)


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_memory_does_not_grow_with_data(name, rng):
    observer = make_observer(name)
    observer.update(rng.standard_normal((50, FEATURES), dtype=np.float32))
    before = state_bytes(observer)
    for x in chunks(rng, count=10, scale=10.0):
        observer.update(x)
    assert state_bytes(observer) == before


def test_bad_observer_specs():
    with pytest.raises(LowbitError, match="unknown observer 'nope'.*known: minmax"):
        parse_observers(["nope"])
    with pytest.raises(LowbitError, match="observer 'percentile': percentile must be within"):
        parse_observers({"percentile": {"percentile": 120}})
    with pytest.raises(LowbitError, match="observer 'mse': unknown element_type 'int9'"):
        parse_observers({"mse": {"element_type": "int9"}})
    with pytest.raises(LowbitError, match="observer 'absmax':.*unexpected keyword"):
        parse_observers({"absmax": {"bins": 3}})
    with pytest.raises(LowbitError, match="no observers"):
        parse_observers([])
    with pytest.raises(ValueError, match="rows of 3 features after rows of 24"):
        observer = make_observer("absmax")
        observer.update(np.ones((2, FEATURES), np.float32))
        observer.update(np.ones((2, 3), np.float32))
