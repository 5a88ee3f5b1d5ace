"""Streaming safetensors reading and atomic writing."""
from .reader import SafetensorsReader, TensorInfo, UnifiedSafetensorsLoader, read_header
from .writer import StreamingWriter, header_reserve

__all__ = ["SafetensorsReader", "UnifiedSafetensorsLoader", "TensorInfo", "read_header", "StreamingWriter", "header_reserve"]
