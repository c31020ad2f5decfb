"""Calibration: sample data, activation capture through ONNX Runtime, and observers of activation statistics.

Used by activation quantization (static ranges) and by data-aware weight algorithms (GPTQ's Hessians).
See docs/calibration.md.
"""

from lowbit.converter.calibration.calibrate import calibrate_layerwise, calibrate_statistics, observe
from lowbit.converter.calibration.capture import ActivationCapture, CaptureSite
from lowbit.converter.calibration.data import (
    DEFAULT_CALIBRATION_FILE,
    ROW_FORMATS,
    CalibrationSettings,
    load_calibration_samples,
)
from lowbit.converter.calibration.fake_quant import ELEMENT_TYPES, ElementType, fake_quantize
from lowbit.converter.calibration.histogram import AbsHistogram
from lowbit.converter.calibration.observers import (
    OBSERVERS,
    Observer,
    ObserverSpec,
    ValueRange,
    make_observer,
    parse_observers,
    register_observer,
)

__all__ = [
    "DEFAULT_CALIBRATION_FILE",
    "ELEMENT_TYPES",
    "OBSERVERS",
    "ROW_FORMATS",
    "AbsHistogram",
    "CalibrationSettings",
    "ActivationCapture",
    "CaptureSite",
    "ElementType",
    "Observer",
    "ObserverSpec",
    "ValueRange",
    "calibrate_layerwise",
    "calibrate_statistics",
    "fake_quantize",
    "load_calibration_samples",
    "make_observer",
    "observe",
    "parse_observers",
    "register_observer",
]
