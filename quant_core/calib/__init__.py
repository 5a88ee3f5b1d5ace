"""Calibration: per-layer input statistics (docs/CALIBRATION.md) — file I/O, streaming accumulation, recording from a
module run (forward hooks), synthetic and LoRA-informed sources."""
from .file import CalibrationFile, load_calibration, save_calibration
from .record import record_activation_stats
from .stats import InputStats, StatsAccumulator
from .source import CalibrationSource, lora_stats, synthetic_stats

__all__ = ["CalibrationFile", "CalibrationSource", "InputStats", "StatsAccumulator", "load_calibration",
           "lora_stats", "record_activation_stats", "save_calibration", "synthetic_stats"]
