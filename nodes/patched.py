"""The tensors of a MODEL or CLIP as the graph holds them — base weights plus every weight patch (LoRA, LoCon/LoHa/LoKr,
merges, diffs) — exposed to the engine as a `quant_core` ComputedSource.

Each tensor is computed when the engine asks for it, with ComfyUI's own patch arithmetic (`ModelPatcher`'s
`get_key_patches` for the base weight and its patches, `comfy.lora.calculate_weight` for the sum), on the device
ComfyUI loads the model on, one tensor at a time: no copy of the model is made. A weight that will be quantized comes
in fp32 before any rounding; a tensor written as it is comes exactly as ComfyUI computes it for sampling (its compute
dtype, then rounded to the stored dtype with ComfyUI's rounding), so an unquantized save reloads bit for bit.

The output keys are those of a file ComfyUI's stock loaders read: a diffusion-model file (Load Diffusion Model), or
one text encoder's file (Load CLIP). The layout is checked by running ComfyUI's own detection on it before anything is
written. Imported only inside ComfyUI.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .. import quant_core
from ..quant_core import QuantError

DTYPES = {"as loaded": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DIFFUSION_PREFIX = "diffusion_model."
MAX_GRAPH_NODES = 64  # upstream nodes named in the header


@dataclass(frozen=True)
class PatchedSource:
    """What Save Quantized opens: a MODEL or CLIP patcher and how its keys map to the output file's."""

    patcher: object  # comfy.model_patcher.ModelPatcher
    key_map: tuple[tuple[str, str], ...]  # (output key, the patcher's state-dict key), in model order
    dtype: object  # torch dtype of tensors written unquantized, None: each as the model holds it
    label: str  # e.g. "MODEL (Flux) + lora (13 tensors)"
    provenance: dict = field(default_factory=dict)  # header entry: source nodes, patches, what is not saved
    notes: tuple[str, ...] = ()

    def open(self):
        """The source the engine streams; the base weights and patches are read now (the graph may have loaded
        and patched the model since the node ran)."""
        key_patches = self.patcher.get_key_patches()
        wanted = dict(self.key_map)
        missing = [k for k in wanted.values() if k not in key_patches]
        if missing:
            raise QuantError(f"{self.label}: the model no longer has {missing[0]} (changed since the plan was made); "
                             "queue the workflow again")
        entries = {out: key_patches[key] for out, key in self.key_map}
        tensors = [quant_core.SourceTensor(out, stored_dtype(self.dtype, entries[out][0][0]),
                                           tuple(entries[out][0][0].shape)) for out, _ in self.key_map]
        on_the_fly = bool(getattr(self.patcher, "is_dynamic", lambda: False)())
        compute = _Computer(entries, wanted, self.dtype, self.patcher.load_device, on_the_fly)
        return quant_core.ComputedSource(self.label, tensors, compute, {"quant_core_source": json.dumps(self.provenance)},
                              files=_source_files(self.patcher))



FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def stored_dtype(asked, weight: torch.Tensor) -> torch.dtype:
    """The dtype a tensor is written in unquantized: the one asked for, else the model's own (bf16 for fp8)."""
    if asked is not None:
        return asked
    return torch.bfloat16 if weight.dtype in FP8 else weight.dtype


class _Computer:
    """compute(output key, exact) for ComputedSource: ComfyUI's patch arithmetic on one tensor."""

    def __init__(self, entries: dict, keys: dict[str, str], dtype, device, on_the_fly: bool):
        self.entries, self.keys, self.dtype, self.device = entries, keys, dtype, device
        self.on_the_fly = on_the_fly  # dynamic VRAM: ComfyUI patches while sampling, in the weight's own dtype

    def __call__(self, name: str, exact: bool) -> torch.Tensor:
        with torch.no_grad():  # the model's parameters may require grad: no autograd graph per weight
            return self._compute(name, exact).detach()

    def _compute(self, name: str, exact: bool) -> torch.Tensor:
        import comfy.lora
        import comfy.model_management as mm
        (base, convert, *_), *patches = self.entries[name]
        key = self.keys[name]
        stored = stored_dtype(self.dtype, base)
        if not patches and not exact and base.dtype == stored:
            return base.to("cpu")  # untouched by any patch: the model's own tensor
        # A tensor written as it is: patched the way ComfyUI patches it for sampling. Loading the classic way, it
        # computes in its LoRA compute dtype (fp32, fp16 on some GPUs) and rounds to the stored dtype; with dynamic
        # VRAM it patches each weight on the fly in that weight's dtype. A weight to quantize: fp32 throughout.
        intermediate = torch.float32  # calculate_weight's default, which ModelPatcher uses
        if exact:
            compute = torch.float32
        elif self.on_the_fly and base.dtype == stored:
            compute = intermediate = stored
        else:
            compute = mm.lora_compute_dtype(self.device) if hasattr(mm, "lora_compute_dtype") else torch.float32
        weight = mm.cast_to_device(base, self.device, compute, copy=True)
        weight = convert(weight, inplace=True)
        if patches:
            with comfy_errors() as errors:
                weight = comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=intermediate)
            if errors:
                raise QuantError(f"{key}: ComfyUI did not apply a patch ({errors[0]}); nothing was written")
        if exact:
            return weight.float()
        return _round_like_comfyui(weight, stored, key).to("cpu")


def _round_like_comfyui(weight: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    import comfy.float
    return comfy.float.stochastic_rounding(weight, dtype, seed=_string_to_seed(key))


def _string_to_seed(key: str) -> int:
    import comfy.utils
    if hasattr(comfy.utils, "string_to_seed"):
        return comfy.utils.string_to_seed(key)
    import comfy.model_patcher  # ComfyUI before 0.4 kept it there
    return comfy.model_patcher.string_to_seed(key)


def _source_files(patcher) -> tuple[tuple[str, str], ...]:
    """The model file ComfyUI loaded (newer ComfyUI records it for reloading): the output must not replace it."""
    init = getattr(patcher, "cached_patcher_init", None)
    if init and len(init) > 1 and init[1] and isinstance(init[1][0], str):
        return (("source model", init[1][0]),)
    return ()


# --- what the patcher holds -----------------------------------------------------------------------------------------

def check_weights(patcher, keys: list[str], what: str) -> str | None:
    """Refuse a model whose weights cannot be read as floating point (already quantized by its loader). Returns
    'N weights in float8_e4m3fn' when the loader holds weights in fp8 (its weight_dtype), else None."""
    import comfy.model_patcher
    fp8: dict[str, int] = {}
    for key in keys:
        weight, set_func, _ = comfy.model_patcher.get_key_weight(patcher.model, key)
        quantized = set_func is not None or not torch.is_floating_point(weight) or \
            type(weight) not in (torch.Tensor, torch.nn.Parameter)
        if quantized and key.endswith(".weight"):
            raise QuantError(f"{what}: {key} is already quantized in this model ({type(weight).__name__}, "
                             f"{weight.dtype}); load the floating-point model to quantize it")
        if weight.dtype in FP8:
            name = str(weight.dtype).removeprefix("torch.")
            fp8[name] = fp8.get(name, 0) + 1
    return ", ".join(f"{n} weights in {dtype}" for dtype, n in fp8.items()) or None


def check_patches(patcher, keys: set[str], what: str) -> None:
    """Every weight patch must apply to its tensor (a LoRA made for another model does not): ComfyUI's patch
    arithmetic runs once per patched tensor on shape-only ("meta") tensors — no memory, no compute — and any patch
    ComfyUI reports as not applied is refused here, before anything is written."""
    import comfy.lora
    import comfy.model_patcher
    for key, patches in patcher.patches.items():
        if key not in keys:
            continue
        weight, _, _ = comfy.model_patcher.get_key_weight(patcher.model, key)
        probe = torch.empty(weight.shape, dtype=torch.float32, device="meta")
        with comfy_errors() as errors:
            try:
                comfy.lora.calculate_weight(patches, probe, key)
            except Exception:  # an adapter that needs real values: checked when the weight is computed
                continue
        if errors:
            raise QuantError(f"{what}: a patch does not apply to {key} {list(weight.shape)} ({errors[0]}); "
                             "remove the LoRA or model that does not belong to this model")


class comfy_errors:
    """Collects what ComfyUI logs (warning or worse) while a patch is computed: it logs a patch it cannot apply
    and leaves the weight unpatched, which a quantized file must not silently inherit."""

    def __enter__(self) -> list[str]:
        import logging
        self.messages: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(" ".join(record.getMessage().split())[:200])
        logging.getLogger().addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc):
        import logging
        logging.getLogger().removeHandler(self.handler)
        return False


def describe_patches(patcher, keys: set[str]) -> dict:
    """Weight patches by kind: how many tensors each kind touches and with which strengths."""
    kinds: dict[str, dict] = {}
    for key, patches in patcher.patches.items():
        if key not in keys:
            continue
        for patch in patches:
            kind = _patch_kind(patch[1])
            entry = kinds.setdefault(kind, {"tensors": 0, "strengths": []})
            entry["tensors"] += 1
            strength = round(float(patch[0]), 4)
            if strength not in entry["strengths"] and len(entry["strengths"]) < 8:
                entry["strengths"].append(strength)
    return kinds


def _patch_kind(value) -> str:
    if isinstance(value, list):
        return "merge with a patched model"
    if isinstance(value, tuple):
        if value and isinstance(value[0], str):
            return value[0]  # "diff", "set", "lora", "loha", "lokr", "glora" … (older ComfyUI)
        if value and isinstance(value[0], torch.Tensor):
            return "merge with another model's weights" if len(value) <= 2 else "lora"
        return "patch"
    return type(value).__name__.removesuffix("Adapter").lower() or "patch"  # weight adapters of newer ComfyUI


def unsaved_changes(patcher) -> list[str]:
    """What changes the model's output but is no weight (so no file can hold it): listed in the report."""
    options = getattr(patcher, "model_options", {}) or {}
    found = []
    transformer = options.get("transformer_options", {}) or {}
    for name in ("patches", "patches_replace"):
        for kind, value in (transformer.get(name) or {}).items():
            found.append(f"{name} {kind} ({len(value)})")
    for name in ("model_function_wrapper", "sampler_cfg_function", "denoise_mask_function"):
        if options.get(name) is not None:
            found.append(name)
    for name in ("sampler_post_cfg_function", "sampler_pre_cfg_function"):
        if options.get(name):
            found.append(f"{name} ({len(options[name])})")
    found += [f"object patch {name}" for name in (getattr(patcher, "object_patches", None) or {})]
    if getattr(patcher, "hook_patches", None):
        found.append(f"hook patches on {len(patcher.hook_patches)} tensors")
    return found


def upstream_nodes(prompt, node_id, input_name: str) -> list[str]:
    """The nodes of the queued prompt that feed `input_name` of node `node_id`, loaders first: class and widget
    values (e.g. "LoraLoaderModelOnly lora_name=x.safetensors strength_model=0.8")."""
    if not isinstance(prompt, dict) or str(node_id) not in prompt:
        return []
    order: list[str] = []
    seen: set[str] = set()

    def visit(link):
        if not (isinstance(link, list) and len(link) == 2) or str(link[0]) in seen or len(seen) >= MAX_GRAPH_NODES:
            return
        nid = str(link[0])
        seen.add(nid)
        node = prompt.get(nid, {})
        for value in (node.get("inputs") or {}).values():
            visit(value)
        order.append(nid)

    visit((prompt[str(node_id)].get("inputs") or {}).get(input_name))
    lines = []
    for nid in order:
        node = prompt[nid]
        widgets = " ".join(f"{k}={_short(v)}" for k, v in (node.get("inputs") or {}).items()
                           if not isinstance(v, list))
        lines.append(f"{node.get('class_type', '?')} {widgets}".strip())
    return lines


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "…"


# --- output key layouts --------------------------------------------------------------------------------------------

def model_key_map(patcher) -> tuple[tuple[tuple[str, str], ...], str]:
    """(output key, model key) pairs of a diffusion-model file ComfyUI detects as this model, and the model's
    class name. The keys ComfyUI holds under `diffusion_model.` are tried as they are (the layout of most
    diffusion-model files), then as ComfyUI's own checkpoint save writes them; the first layout that ComfyUI's
    detection maps back onto exactly this model's keys is used. QuantError when none does."""
    import comfy.utils
    model = patcher.model
    config = getattr(model, "model_config", None)
    name = type(config).__name__ if config is not None else type(model).__name__
    state = patcher.model_state_dict()
    native = {k[len(DIFFUSION_PREFIX):]: state[k] for k in state if k.startswith(DIFFUSION_PREFIX)}
    if config is None or not native:
        raise QuantError(f"MODEL ({name}): no diffusion-model weights under '{DIFFUSION_PREFIX}'; this model type has "
                         "no known key layout")
    layouts = [("diffusion-model keys", {k: k for k in native})]
    if hasattr(config, "process_unet_state_dict_for_saving"):
        try:
            saved = config.process_unet_state_dict_for_saving({k: k for k in native})
            if all(isinstance(v, str) for v in saved.values()):
                layouts.append(("checkpoint keys", saved))
        except Exception:  # a model whose save rewrites tensors: not a key layout
            pass
    problems = []
    for label, layout in layouts:
        problem = _detected_as(layout, native, config)
        if problem is None:
            return tuple((out, DIFFUSION_PREFIX + key) for out, key in layout.items()), name
        problems.append(f"{label}: {problem}")
    raise QuantError(f"MODEL ({name}): no key layout that ComfyUI's loader reads back as this model "
                     f"({'; '.join(problems)})")


def _detected_as(layout: dict[str, str], native: dict, config) -> str | None:
    """None if ComfyUI's diffusion-model loader, given a file with these keys, builds this model class and loads
    every weight into it; else why not."""
    import comfy.model_detection as detection
    import comfy.utils
    sd = {out: native[key] for out, key in layout.items()}
    prefix = detection.unet_prefix_from_state_dict(sd)
    stripped = comfy.utils.state_dict_prefix_replace(dict(sd), {prefix: ""}, filter_keys=True)
    if stripped:
        sd = stripped
    try:
        found = detection.model_config_from_unet(sd, "")
    except Exception as e:  # detection reads shapes only; anything else means it does not know these keys
        return f"detection failed ({type(e).__name__})"
    if found is None:
        return "ComfyUI detects no model in these keys"
    if type(found) is not type(config):
        return f"detected as {type(found).__name__}, not {type(config).__name__}"
    differs = _config_difference(found.unet_config, config.unet_config)
    if differs:
        return f"detected with {differs} (a different {type(config).__name__} would be built)"
    loaded = set(found.process_unet_state_dict(dict(sd)))
    if loaded != set(native):
        extra = sorted(set(native) - loaded) or sorted(loaded - set(native))
        return f"{len(set(native) ^ loaded)} keys would not load (e.g. {extra[0]})"
    return None


def _config_difference(detected: dict, held: dict) -> str | None:
    """The first architecture setting ComfyUI would detect differently from the model the graph holds."""
    for name, value in detected.items():
        if name in ("dtype", "device", "operations") or name not in held:
            continue
        if isinstance(value, (bool, int, float, str, list, tuple, type(None))) and value != held[name]:
            return f"{name}={value!r} where this model has {held[name]!r}"
    return None


def clip_encoders(patcher) -> list[str]:
    """The text encoders of a CLIP (clip_l, t5xxl, …): the first name of its state-dict keys."""
    names = []
    for key in patcher.model_state_dict():
        head = key.split(".", 1)[0]
        if "." in key and head not in names:
            names.append(head)
    return names


def clip_key_map(patcher, encoder: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """(output key, CLIP key) pairs of one text encoder's file (as ComfyUI's CLIP Save writes it: the encoder name
    and `transformer.` removed), checked with ComfyUI's text-encoder detection; and the detected type."""
    import comfy.sd
    state = patcher.model_state_dict()
    prefix = f"{encoder}."
    pairs = []
    for key in state:
        if key.startswith(prefix):
            out = key[len(prefix):]
            pairs.append((out.removeprefix("transformer."), key))
    if not pairs:
        raise QuantError(f"CLIP: no encoder {encoder!r} (this CLIP has {', '.join(clip_encoders(patcher))})")
    sd = {out: state[key] for out, key in pairs}
    if len(sd) != len(pairs):
        raise QuantError(f"CLIP {encoder}: two keys map to one name once 'transformer.' is removed")
    detected = comfy.sd.detect_te_model(sd) if hasattr(comfy.sd, "detect_te_model") else None
    if detected is None:
        raise QuantError(f"CLIP {encoder}: ComfyUI's text-encoder loader does not recognise these keys; this encoder "
                         "type has no known file layout")
    return tuple(pairs), getattr(detected, "name", str(detected))
