"""Sources other than a safetensors file: the tensors of a model another program holds (ComfyUI's MODEL or CLIP
with its patches), computed one at a time when the pipeline asks for them.

`ComputedSource` offers the part of `SafetensorsReader`'s API the pipeline, SmoothQuant and verify use (keys, infos,
metadata, get_tensor, iter_tensors), so a conversion streams it exactly like a file: nothing is computed ahead, and
only the tensor being quantized or written is alive.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import QuantError
from .dtypes import tag_of
from .reader import SafetensorsReader, TensorInfo


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the output file: its key there, and the dtype and shape it has when written unquantized."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class ComputedSource:
    """Tensors computed on request by `compute(name, exact)`.

    `exact=True` asks for a weight that will be quantized: its value in fp32, before any rounding to the dtype it
    would be stored in (it may live on a GPU); `exact=False` for the tensor exactly as it is written unquantized, in
    its `SourceTensor.dtype`. `files` are (role, path) of files the source reads, which the output may not replace.
    `source_bytes` is the size of the model as held (what the report compares the output with)."""

    final_dtypes = True  # tensors arrive in the dtype they are written in: --format fp16 does not cast them

    def __init__(self, label: str, tensors: list[SourceTensor], compute: Callable[[str, bool], torch.Tensor],
                 metadata: dict[str, str] | None = None, files: tuple[tuple[str, str], ...] = ()):
        self.path = label
        self.files = files
        self._compute = compute
        self._metadata = dict(metadata or {})
        self._infos: dict[str, TensorInfo] = {}
        for t in tensors:
            if t.name in self._infos:
                raise QuantError(f"{label}: two tensors would be written as {t.name}")
            nbytes = t.dtype.itemsize
            for d in t.shape:
                nbytes *= d
            self._infos[t.name] = TensorInfo(t.name, tag_of(t.dtype), tuple(t.shape), 0, nbytes)
        self.source_bytes = sum(i.nbytes for i in self._infos.values())

    def keys(self) -> list[str]:
        return list(self._infos)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {key!r}") from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def get_shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def get_ndim(self, key: str) -> int:
        return len(self.info(key).shape)

    def get_dtype(self, key: str) -> str:
        return self.info(key).dtype

    def get_tensor(self, key: str) -> torch.Tensor:
        """The tensor as written unquantized (its own dtype, on the CPU)."""
        return self._checked(key, self._compute(key, False), exact=False)

    def iter_tensors(self, keys: Iterable[str], prefetch_bytes: int = 0,
                     exact: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) in order; keys in `exact` come as fp32 values before rounding (they are quantized).
        `prefetch_bytes` is accepted for the reader's API; nothing is computed ahead."""
        for key in keys:
            yield key, self._checked(key, self._compute(key, key in exact), key in exact)

    def _checked(self, key: str, tensor: torch.Tensor, exact: bool) -> torch.Tensor:
        info = self.info(key)
        if tuple(tensor.shape) != info.shape:
            raise QuantError(f"{self.path}: {key} came out with shape {list(tensor.shape)}, expected {list(info.shape)} "
                             "(a patch changed the weight's shape)")
        if not exact and tag_of(tensor.dtype) != info.dtype:
            raise QuantError(f"{self.path}: {key} came out as {tensor.dtype}, expected {info.dtype}")
        return tensor

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_source(source):
    """A reader for `source`: a path (a safetensors file, streamed) or an already built `ComputedSource`."""
    if isinstance(source, str):
        return SafetensorsReader(source, low_memory=True)
    if isinstance(source, ComputedSource):
        return source
    raise QuantError(f"the source must be a .safetensors path or a ComputedSource, got {type(source).__name__}")
