"""The lazy plan the nodes pass along their links (ComfyUI type `QUANT_PLAN`).

It holds paths and settings, never tensors: Load Safetensors names the source file, Merge LoRA / SmoothQuant /
Quantize add pending operations, and only Save Quantized streams the file through `quant_core.convert`. A 24 GB
model therefore never sits in RAM between nodes, and ComfyUI's cache keys stay small. Instances are immutable:
each node returns a new recipe, so a cached upstream output is never changed by a downstream node.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ..quant_core.errors import QuantError
from ..quant_core.options import QuantOptions


@dataclass(frozen=True)
class LoraStep:
    path: str  # absolute, already confined to ComfyUI's loras folders
    name: str  # as listed in the node ("loras/x.safetensors")
    strength: float


@dataclass(frozen=True)
class QuantRecipe:
    source: str  # absolute path of the checkpoint, confined to ComfyUI's model folders
    source_name: str  # as listed in the node ("diffusion_models/flux.safetensors")
    fingerprint: str  # size and modification time: an edited file re-runs everything downstream
    loras: tuple[LoraStep, ...] = ()
    transform: tuple[tuple[str, object], ...] = ()  # QuantOptions fields set by transform nodes (SmoothQuant)
    quantize: tuple[tuple[str, object], ...] = ()  # QuantOptions fields set by a Quantize node

    def with_lora(self, step: LoraStep) -> QuantRecipe:
        return dataclasses.replace(self, loras=self.loras + (step,))

    def with_transform(self, **fields) -> QuantRecipe:
        return dataclasses.replace(self, transform=tuple({**dict(self.transform), **fields}.items()))

    def with_quantize(self, **fields) -> QuantRecipe:
        if self.quantize:
            raise QuantError("this plan is already quantized by an earlier Quantize node; use one Quantize node per chain")
        return dataclasses.replace(self, quantize=tuple(fields.items()))

    def options(self, **run_fields) -> QuantOptions:
        """The validated engine options for this recipe; `run_fields` are the Save node's (verify, progress…)."""
        if not self.quantize:
            raise QuantError("the plan reaching Save Quantized has no Quantize node; add Quantize (INT8/FP8/NVFP4/MXFP8) "
                             "between Load Safetensors and Save Quantized")
        loras = tuple((step.path, step.strength) for step in self.loras)
        transform, quantize = dict(self.transform), dict(self.quantize)
        smoothing_file, quantize_file = transform.get("calibration_data"), quantize.get("calibration_data")
        if smoothing_file and quantize_file and smoothing_file != quantize_file:
            raise QuantError("SmoothQuant and the Quantize node name two different calibration files; use one")
        if quantize_file is None and smoothing_file:
            quantize["calibration_data"] = smoothing_file  # the Quantize node's "synthetic" means "none of its own"
        fields = {**transform, **quantize, **run_fields, "loras": loras}
        return QuantOptions(**fields).validate()

    def describe(self) -> str:
        """One line per step, for the node's text output and the report."""
        lines = [f"source: {self.source_name}"]
        lines += [f"merge LoRA: {step.name} × {step.strength:g}" for step in self.loras]
        if self.transform:
            lines.append("transform: " + json.dumps(dict(self.transform), default=str))
        if self.quantize:
            lines.append("quantize: " + json.dumps(dict(self.quantize), default=str))
        return "\n".join(lines)


def file_fingerprint(path: str) -> str:
    """Size and modification time (ns): cheap, and changes whenever the file is replaced or edited."""
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"
