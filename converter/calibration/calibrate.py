"""Calibration: samples through an `ActivationCapture`, each site's rows into its observers, one sample at a time.

Memory: one sample's captured activations (Σ over captured values of tokens × features × 4 bytes) plus the
observers' state, which does not depend on the number of samples (converter/calibration/observers.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lowbit.converter.calibration.capture import ActivationCapture
from lowbit.converter.calibration.observers import Observer, ObserverSpec, parse_observers
from lowbit.errors import LowbitError

Progress = Callable[[int, int], None]  # progress(samples done, samples in all)


def _progress_callback(progress: Progress | bool | None, total: int):
    """(callback, close): a tqdm bar for progress=True, the caller's function, or nothing."""
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="calibration", unit="sample")
        return (lambda done, _total: bar.update(1)), bar.close
    if callable(progress):
        return progress, lambda: None
    return (lambda done, _total: None), lambda: None


def observe(
    capture: ActivationCapture,
    specs: tuple[ObserverSpec, ...],
    samples: Sequence[np.ndarray],
    progress: Progress | bool | None = None,
) -> dict[str, dict[str, Observer]]:
    """{site: {observer name: observer}} after every sample went through `capture` (batch 1, one at a time)."""
    if len(samples) == 0:
        raise LowbitError("no calibration samples")
    observers = {site.node: {spec.name: spec.create() for spec in specs} for site in capture.sites}
    report, close = _progress_callback(progress, len(samples))
    try:
        for done, sample in enumerate(samples, start=1):
            for site, rows in capture.run(sample).items():
                for observer in observers[site].values():
                    observer.update(rows)
            report(done, len(samples))
    finally:
        close()
    return observers


def calibrate_statistics(
    model_onnx: str | Path,
    sites: list[str],
    observers: list[str] | dict[str, dict],
    samples: Sequence[np.ndarray],
    progress: Progress | bool | None = None,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    edit: Callable[[object], None] | None = None,
    session_config: dict[str, str] | None = None,
) -> dict[str, dict[str, object]]:
    """{site: {observer name: result}} for the inputs of the named MatMul/Gemm nodes of `model_onnx`.

    observers: registry names, or {name: options} (e.g. {"percentile": {"percentile": 99.9}}).
    samples: 1-D token-id arrays (load_calibration_samples). progress: True for a tqdm bar, or a function
    called as progress(done, total) after each sample. edit: a graph change before capture, session_config: extra
    ORT session entries (ActivationCapture).
    Raises LowbitError for bad input.
    """
    specs = parse_observers(observers)
    capture = ActivationCapture(model_onnx, sites, provider=provider, threads=threads, edit=edit,
                                session_config=session_config)
    state = observe(capture, specs, samples, progress)
    return {site: {name: observer.result() for name, observer in by_name.items()} for site, by_name in state.items()}
