"""Calibration: samples through an `ActivationCapture`, each site's rows into its observers, one sample at a time.

Memory: one sample's captured activations (Σ over captured values of tokens × features × 4 bytes) plus the
observers' state, which does not depend on the number of samples (converter/calibration/observers.py), plus ONNX
Runtime's copy of the model. `calibrate_layerwise` gives the same statistics holding one decoder layer in ONNX
Runtime at a time (calibration/layerwise.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lowbit.converter.calibration.capture import (ActivationCapture, _load_graph, add_capture_outputs,
                                                 folder_session_config)
from lowbit.converter.calibration.layerwise import LAYER_INPUTS, layer_of, walk_layers
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


def calibrate_layerwise(
    model_onnx: str | Path,
    sites: list[str],
    observers: list[str] | dict[str, dict],
    samples: Sequence[np.ndarray],
    progress: Progress | bool | None = None,
    *,
    threads: int | None = None,
    edit: Callable[[object], None] | None = None,
    session_config: dict[str, str] | None = None,
) -> dict[str, dict[str, object]]:
    """`calibrate_statistics` on the CPU, one decoder layer at a time (`layerwise.walk_layers`): ONNX Runtime holds
    one layer's weights instead of the model's, and each sample's residual stream waits on disk between layers,
    so the peak memory follows the largest layer. The same statistics (the same float operations). A model that
    names no layer boundaries (not converted by lowbit) is calibrated whole."""
    import onnx_ir as ir

    model_onnx = Path(model_onnx)
    model = _load_graph(model_onnx)
    if LAYER_INPUTS not in model.metadata_props:
        return calibrate_statistics(model_onnx, sites, observers, samples, progress, threads=threads, edit=edit,
                                    session_config=session_config)
    specs = parse_observers(observers)
    if isinstance(sites, str) or not sites:
        raise LowbitError("give at least one site (a list of node names such as 'layers.0.mlp.down_proj')")
    if edit is not None:
        edit(model)
    proto = ir.serde.serialize_model(model)
    add_capture_outputs(ir.serde.deserialize_model(proto), list(sites), model_onnx)  # checks the sites
    by_layer: dict[int, list[str]] = {}
    for site in dict.fromkeys(sites):
        by_layer.setdefault(layer_of(site), []).append(site)
    results: dict[str, dict[str, object]] = {}

    def finish_layer(index, state) -> bool:
        results.update({site: {name: o.result() for name, o in by_name.items()} for site, by_name in state.items()})
        return False  # the weights stay as they are

    if len(samples) == 0:
        raise LowbitError("no calibration samples")
    report, close = _progress_callback(progress, len(samples) * len(by_layer))
    done = [0]

    def layer_progress(index):
        def step(i, total):
            done[0] += 1
            report(done[0], total * len(by_layer))
        return step

    try:
        walk_layers(model_onnx.resolve().parent, proto, by_layer, samples,
                    lambda site: {spec.name: spec.create() for spec in specs}, finish_layer, layer_progress, threads,
                    folder_session_config(model_onnx.resolve().parent, session_config))
    finally:
        close()
    return {site: results[site] for site in sites}
