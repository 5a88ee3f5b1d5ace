"""Plan from MODEL / Plan from CLIP: quantize what the graph holds — any loader's model with the LoRAs, merges and
weight patches stock nodes applied — instead of a file. The plan they start is the same lazy plan Load Safetensors
starts: Quantize nodes, presets, layer configs, methods, Save Quantized and its report work unchanged.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..quant_core import QuantError
from . import patched
from .recipe import QuantRecipe
from .types import CATEGORY, QuantPlan

AUTO_ENCODER = "auto"


def _dtype_input() -> io.Combo.Input:
    return io.Combo.Input("dtype", options=list(patched.DTYPES), default="as loaded",
                          tooltip="The dtype of tensors written unquantized (norms, biases, layers kept in high "
                                  "precision, or every tensor when no Quantize node follows). 'as loaded': what "
                                  "ComfyUI samples with, so an unquantized save reloads bit for bit. Quantized "
                                  "weights are always rounded from the fp32 patched weight.")


def _check_dtype(dtype) -> None:
    if dtype not in patched.DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(patched.DTYPES)}")


class PlanFromModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCorePlanFromModel",
            display_name="Plan from MODEL (for quantization)",
            category=CATEGORY,
            description="Starts a quantization plan from the MODEL of the graph — as loaded, with every LoRA, LoCon, "
                        "LoHa, LoKr, merge and weight patch of stock nodes applied. Save Quantized computes each "
                        "patched weight with ComfyUI's own patch arithmetic, one layer at a time on ComfyUI's device, "
                        "and writes a diffusion-model file that Load Diffusion Model reloads.",
            inputs=[io.Model.Input("model", tooltip="Any diffusion model: a loader's output after LoRA loaders, "
                                                    "merge nodes or other weight patches."),
                    _dtype_input()],
            outputs=[QuantPlan.Output(display_name="plan", tooltip="The lazy plan: connect a Quantize node (or Save "
                                                                   "Quantized directly for an unquantized save).")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, dtype) -> io.NodeOutput:
        _check_dtype(dtype)
        try:
            key_map, name = patched.model_key_map(model)
            source = _source(model, key_map, dtype, f"MODEL ({name})", {"kind": "diffusion model",
                             "model": name}, _graph(cls, "model"))
        except QuantError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(QuantRecipe(source="", source_name=source.label, fingerprint="", computed=source))


class PlanFromCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCorePlanFromCLIP",
            display_name="Plan from CLIP (for quantization)",
            category=CATEGORY,
            description="Starts a quantization plan from one text encoder of the graph's CLIP, with its LoRAs and "
                        "patches applied. The file has the keys of that encoder's own file (as ComfyUI's CLIP Save "
                        "writes them), so Load CLIP reloads it. A CLIP of several encoders (Flux: clip_l + t5xxl) is "
                        "written one encoder per plan: name it in 'encoder'.",
            inputs=[io.Clip.Input("clip", tooltip="Any CLIP: a loader's output after LoRA loaders or merges."),
                    io.String.Input("encoder", default=AUTO_ENCODER,
                                    tooltip="Which encoder to write (clip_l, clip_g, t5xxl, llama, …); auto: the only "
                                            "one (a CLIP with several is refused, listing them)."),
                    _dtype_input()],
            outputs=[QuantPlan.Output(display_name="plan", tooltip="The lazy plan: connect a Quantize node (with the "
                                                                   "encoder's preset, e.g. t5xxl) or Save Quantized.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, clip, encoder, dtype) -> io.NodeOutput:
        _check_dtype(dtype)
        patcher = getattr(clip, "patcher", None)
        if patcher is None:
            raise ValueError("clip: expected a CLIP from a loader (it has no model patcher)")
        try:
            encoder = _encoder(patcher, encoder.strip())
            key_map, detected = patched.clip_key_map(patcher, encoder)
            source = _source(patcher, key_map, dtype, f"CLIP {encoder} ({detected})",
                             {"kind": "text encoder", "encoder": encoder, "detected": detected},
                             _graph(cls, "clip"))
        except QuantError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(QuantRecipe(source="", source_name=source.label, fingerprint="", computed=source))


def _graph(node, input_name: str) -> list[str]:
    """The upstream nodes of the queued prompt (none when the node runs outside a prompt)."""
    hidden = getattr(node, "hidden", None)
    return patched.upstream_nodes(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None), input_name)


def _encoder(patcher, asked: str) -> str:
    encoders = patched.clip_encoders(patcher)
    if asked and asked != AUTO_ENCODER:
        if asked not in encoders:
            raise QuantError(f"encoder {asked!r}: this CLIP has {', '.join(encoders)}")
        return asked
    if len(encoders) != 1:
        raise QuantError(f"this CLIP holds {len(encoders)} text encoders ({', '.join(encoders)}); a file holds one: "
                         "set 'encoder' to one of them (one Plan from CLIP node per encoder)")
    return encoders[0]


def _source(patcher, key_map, dtype: str, label: str, provenance: dict,
            graph: list[str]) -> patched.PatchedSource:
    """The checked source: weights readable, every patch applicable, provenance for the header."""
    keys = {key for _, key in key_map}
    low = patched.check_weights(patcher, sorted(keys), label)
    patched.check_patches(patcher, keys, label)
    weight_patches = patched.describe_patches(patcher, keys)
    unsaved = patched.unsaved_changes(patcher)
    if weight_patches:
        label += " + " + ", ".join(f"{kind} ({v['tensors']} tensors)" for kind, v in weight_patches.items())
    provenance = {**provenance, "graph": graph, "weight_patches": weight_patches, "not_saved": unsaved,
                  "dtype": dtype}
    notes = ()
    if unsaved:
        notes = (f"not in the file (they change sampling but are not weights): {'; '.join(unsaved)}",)
    if low:
        provenance["held_in"] = low
        notes += (f"the model holds {low}: layers are quantized from those values (load it with weight_dtype default "
                  "to quantize from the original weights)",)
    return patched.PatchedSource(patcher, tuple(key_map), patched.DTYPES[dtype], label, provenance, notes)
