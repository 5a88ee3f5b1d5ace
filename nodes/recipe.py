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

from .. import quant_core
from ..quant_core import QuantError


@dataclass(frozen=True)
class LoraStep:
    path: str  # absolute, already confined to ComfyUI's loras folders
    name: str  # as listed in the node ("loras/x.safetensors")
    strength: float


@dataclass(frozen=True)
class QuantRecipe:
    source: str  # absolute path of the checkpoint, confined to ComfyUI's model folders ("" for a graph's model)
    source_name: str  # as listed in the node ("diffusion_models/flux.safetensors")
    fingerprint: str  # size and modification time: an edited file re-runs everything downstream
    loras: tuple[LoraStep, ...] = ()
    transform: tuple[tuple[str, object], ...] = ()  # settings of transform nodes (SmoothQuant)
    quantize: tuple[tuple[str, object], ...] = ()  # settings of a Quantize node
    computed: object = None  # patched.PatchedSource: the graph's MODEL/CLIP instead of a file (source is then "")

    def open_source(self):
        """What the engine converts: the file's path, or the graph's model computed tensor by tensor."""
        return self.source if self.computed is None else self.computed.open()

    @property
    def notes(self) -> list[str]:
        return list(self.computed.notes) if self.computed is not None else []

    def with_lora(self, step: LoraStep) -> QuantRecipe:
        return dataclasses.replace(self, loras=self.loras + (step,))

    def with_transform(self, **fields) -> QuantRecipe:
        return dataclasses.replace(self, transform=tuple({**dict(self.transform), **fields}.items()))

    def with_quantize(self, **fields) -> QuantRecipe:
        if self.quantize:
            raise QuantError("this plan is already quantized by an earlier Quantize node; use one Quantize node per chain")
        return dataclasses.replace(self, quantize=tuple(fields.items()))

    def job(self, **run_settings):
        """The checked engine job for this recipe; `run_settings` are the Save node's (verify, progress…)."""
        quantize = dict(self.quantize)
        if not quantize and self.computed is None:
            raise QuantError("the plan reaching Save Quantized has no Quantize node; add Quantize (INT8/FP8/NVFP4/MXFP8) "
                             "between Load Safetensors and Save Quantized")
        if not quantize:  # the graph's patched model saved unquantized, in the dtypes its Plan node chose
            quantize = {"format": "fp16"}
        loras = tuple((step.path, step.strength) for step in self.loras)
        steps = [("a transform node", dict(self.transform)), ("the Quantize node", quantize),
                 ("Save Quantized", run_settings)]
        settings = quant_core.combine_settings(steps)
        if loras:
            settings["loras"] = loras
        return quant_core.Job.build(settings, given=quant_core.given_by_value(settings))

    def describe(self) -> str:
        """One line per step, for the node's text output and the report."""
        lines = [f"source: {self.source_name}"]
        if self.computed is not None:
            lines += [f"  from: {node}" for node in self.computed.provenance.get("graph", [])]
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


def require_plan(plan) -> "QuantRecipe":
    """The plan input of a node, checked: a link from a quantization node, not a typed-in value."""
    if not isinstance(plan, QuantRecipe):
        raise ValueError(f"plan: expected a QUANT_PLAN link from Load Safetensors or Plan from MODEL/CLIP (or a later quantization node), "
                         f"got {type(plan).__name__}")
    return plan
