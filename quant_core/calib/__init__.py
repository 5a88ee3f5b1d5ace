"""Calibration: per-layer input statistics (docs/CALIBRATION.md) — file I/O, streaming accumulation, recording from a
module run (forward hooks), synthetic source."""
from .file import CalibrationFile, load_calibration, save_calibration
from .record import record_activation_stats
from .stats import InputStats, StatsAccumulator
from .source import CalibrationSource, synthetic_stats

__all__ = ["CalibrationFile", "CalibrationSource", "InputStats", "StatsAccumulator", "load_calibration",
           "record_activation_stats", "save_calibration", "synthetic_stats"]
