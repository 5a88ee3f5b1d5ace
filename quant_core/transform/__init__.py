"""Transforms between reading and quantizing: SmoothQuant (function-preserving rescaling) and static activation
scales, both driven by a calibration statistics file (docs/CALIBRATION.md)."""
