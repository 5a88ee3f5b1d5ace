#!/usr/bin/env python3
"""Check that a quant_core output file loads and runs through stock ComfyUI's own loader code (CPU).

Run it with the Python of a ComfyUI install, with the ComfyUI checkout on PYTHONPATH (plus import
stubs for torchvision/torchaudio where that Python lacks them, see tests/comfy_stubs/):

    PYTHONPATH=/path/to/ComfyUI[:stubs] /path/to/comfy/python tests/comfyui_check.py OUT.safetensors SRC.safetensors

This file is quant_core's own test code; it only *calls* ComfyUI (nothing of ComfyUI is copied here).

Part 1, per layer (for each of ComfyUI's two safetensors readers):
  * ``comfy.utils.load_torch_file(OUT, return_metadata=True)`` with
    ``comfy.memory_management.aimdo_enabled`` False (the ``safetensors.safe_open`` reader, ComfyUI's
    default on CPU) and True (ComfyUI's own mmap header parser ``comfy.utils.load_safetensors``, the
    default on GPUs with DynamicVRAM); both results must be bit-identical.
  * ``comfy.utils.convert_old_quants`` (header ``_quantization_metadata`` -> ``<layer>.comfy_quant``
    markers) and ``comfy.utils.detect_layer_quantization``, as ``comfy.sd.load_diffusion_model_state_dict``
    and ``model_detection.model_config_from_unet`` do. Header and in-file markers must agree.
  * ops from ``comfy.ops.pick_operations`` with ``model_config.quant_config`` set and the dtypes ComfyUI
    picks for a quantized diffusion model on this device (``unet_dtype`` / ``unet_manual_cast``), i.e. the
    mixed-precision ops with the formats this device can't run natively emulated (dequantized).
  * for every marked layer: ``ops.Linear`` inside a module tree named like the layer,
    ``load_state_dict(strict=False)`` like ``BaseModel.load_model_weights``; no missing/unexpected keys,
    the weight must become a ``QuantizedTensor`` with the format's layout, the on-disk tensors must have
    the shapes/dtypes the format needs (ComfyUI does not check them), and the forward pass on random
    input must match ``F.linear`` with the SRC weight within the per-format relative-error bound (the
    dequantized weight too).

Part 2, whole model (``--unet``): ``comfy.sd.load_diffusion_model(OUT)`` (and the aimdo reader's state
dict through ``comfy.sd.load_diffusion_model_state_dict``), the path of ComfyUI's "Load Diffusion Model"
node. SRC is loaded the same way as the reference. Checks: same architecture detected as for SRC,
no ``unet missing`` / ``unet unexpected`` / ``Missing weight`` warnings, every marked layer is a
``QuantizedTensor`` of the right layout inside the model, each quantized module of the loaded model vs. the
same module of the SRC model, and (Flux-family models) a full forward pass vs. the SRC model.
With ``--unet auto`` (default) a SRC that ComfyUI can't load as a diffusion model skips part 2;
``--unet require`` makes that a failure.

Exit status: 0 ok; 1 load problem (exception, missing/unexpected keys, wrong storage, reader mismatch,
architecture not detected with --unet require ...); 2 loads but a forward/dequantize raises;
3 runs but an error is above its bound or not finite.
"""
import argparse
import ast
import json
import logging
import math
import sys
import zlib

# ---- ComfyUI bootstrap: CPU only, don't parse our argv -------------------------------------------
import comfy.options

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args as comfy_args  # noqa: E402

comfy_args.cpu = True

# ComfyUI's main.py initialises comfy_aimdo before importing comfy.* (comfy_aimdo.model_mmap binds its
# library at import time). init() only loads the shared library, no GPU needed.
try:
    import comfy_aimdo.control  # noqa: E402

    _AIMDO_OK = bool(comfy_aimdo.control.init("cuda"))
    _AIMDO_ERR = "comfy_aimdo.control.init() returned False"
except Exception as _e:  # noqa: BLE001
    _AIMDO_OK, _AIMDO_ERR = False, f"{type(_e).__name__}: {_e}"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import comfy.memory_management  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor  # noqa: E402

# Max relative L2 error (layer output vs. F.linear with the SRC weight, random N(0,1) input; the same
# bound is applied to the dequantized weight and to the whole-model output).
BOUNDS = {
    "int8_tensorwise": 0.03,
    "float8_e4m3fn": 0.06,
    "float8_e5m2": 0.12,
    "nvfp4": 0.20,
    "mxfp8": 0.06,
    "convrot_w4a4": 0.30,
}
DEFAULT_BOUND = 0.30
# Flux's supported_inference_dtypes, also ComfyUI's default list.
INFERENCE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# exit codes, worst wins
OK, LOAD, RUN, HIGH = 0, 1, 2, 3
_RANK = {OK: 0, HIGH: 1, RUN: 2, LOAD: 3}
_NAME = {OK: "OK", LOAD: "FAIL", RUN: "RUN-FAIL", HIGH: "HIGH"}


class Problems:
    def __init__(self):
        self.items = []

    def add(self, code, what):
        self.items.append((code, what))

    def exit_code(self):
        codes = [c for c, _ in self.items]
        return max(codes, key=_RANK.get) if codes else OK


class LogCapture(logging.Handler):
    """Collects ComfyUI's log messages (its missing/unexpected-key reporting is a log warning)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))

    def since(self, n, level=logging.WARNING):
        return [m for lv, m in self.records[n:] if lv >= level]


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    n = torch.linalg.vector_norm(b).item()
    d = torch.linalg.vector_norm(a - b).item()
    return d / n if n > 0 else d


def read_file(path, reader):
    """comfy.utils.load_torch_file with the reader ComfyUI would use with/without DynamicVRAM."""
    prev = comfy.memory_management.aimdo_enabled
    comfy.memory_management.aimdo_enabled = reader == "aimdo"
    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    finally:
        comfy.memory_management.aimdo_enabled = prev
    return sd, metadata or {}


def decode_marker(t):
    return json.loads(t.numpy().tobytes())


def markers_of(sd):
    return {k[: -len(".comfy_quant")]: decode_marker(v) for k, v in sd.items() if k.endswith(".comfy_quant")}


def tree_for(layer, leaf):
    """Root module whose attribute path is `layer`, so state-dict prefixes match ComfyUI's."""
    root = torch.nn.Module()
    cur = root
    *parents, last = layer.split(".")
    for p in parents:
        nxt = torch.nn.Module()
        cur.add_module(p, nxt)
        cur = nxt
    cur.add_module(last, leaf)
    return root


def layer_tensors(sd, layer):
    pre = layer + "."
    return {k: v for k, v in sd.items() if k.startswith(pre) and "." not in k[len(pre):]}


def _ru(x, m):
    return (x + m - 1) // m * m


def storage_problems(fmt, conf, sub, layer, n, k):
    """On-disk shapes/dtypes vs. what ComfyUI + comfy_kitchen need for an [n, k] Linear.

    ComfyUI does not validate these at load time (the weight is value-cast with .to(storage_t), scales are
    bit-viewed), so a wrong layout loads silently and fails or computes garbage later."""
    out = []
    w, s1, s2 = (sub.get(f"{layer}.{s}") for s in ("weight", "weight_scale", "weight_scale_2"))

    def want(name, t, shapes, dtypes):
        if t is None:
            out.append(f"{name} missing")
            return
        if shapes is not None and tuple(t.shape) not in [tuple(s) for s in shapes]:
            out.append(f"{name} shape {tuple(t.shape)} not in {[tuple(s) for s in shapes]}")
        if dtypes is not None and t.dtype not in dtypes:
            out.append(f"{name} dtype {str(t.dtype).replace('torch.', '')} not in "
                       f"{[str(d).replace('torch.', '') for d in dtypes]}")

    scalar = [(), (1,), (1, 1)]
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if fmt == "int8_tensorwise":
        want("weight", w, [(n, k)], (torch.int8,))
        # [N,1] per row or a scalar; a 1-D [N] scale works in int8_linear but dequantize() broadcasts it over K
        want("weight_scale", s1, scalar + [(n, 1)], floats)
        g = conf.get("convrot_groupsize", conf.get("params", {}).get("convrot_groupsize"))
        if conf.get("convrot", conf.get("params", {}).get("convrot")) and (not g or k % int(g)):
            out.append(f"convrot group size {g!r} does not divide K={k}")
    elif fmt in ("float8_e4m3fn", "float8_e5m2"):
        want("weight", w, [(n, k)], (QUANT_ALGOS[fmt]["storage_t"],))  # U8 bytes would be value-cast = garbage
        want("weight_scale", s1, scalar, floats)  # per-row fp8 scales break ComfyUI's linear
    elif fmt == "nvfp4":
        n16, k16 = _ru(n, 16), _ru(k, 16)
        want("weight", w, [(n16, k16 // 2)], (torch.uint8,))
        want("weight_scale", s1, [(_ru(n16, 128), _ru(k16 // 16, 4))], (torch.float8_e4m3fn, torch.uint8))
        want("weight_scale_2", s2, scalar, (torch.float32,))
    elif fmt == "mxfp8":
        n32, k32 = _ru(n, 32), _ru(k, 32)
        want("weight", w, [(n32, k32)], (torch.float8_e4m3fn,))
        # ComfyUI's own parser has no F8_E8M0 dtype: the E8M0 exponents must be stored as U8
        want("weight_scale", s1, [(_ru(n32, 128), _ru(k32 // 32, 4))], (torch.uint8,))
    elif fmt == "convrot_w4a4":
        want("weight", w, [(n, k // 2)], (torch.int8,))  # two INT4 codes per byte, value-cast to int8 on load
        want("weight_scale", s1, [(n,)], floats)  # comfy-kitchen's INT4 kernels take a 1-D per-row scale only
        g = conf.get("convrot_groupsize", conf.get("params", {}).get("convrot_groupsize", 256))
        if k % int(g) or k % 64:
            out.append(f"convrot_w4a4: K={k} must be a multiple of convrot_groupsize {g!r} and of 64")
    return out


def expectation_problems(a, fmt, conf, sub, layer, n):
    out = []
    if a.expect_format and fmt != a.expect_format:
        out.append(f"format {fmt!r} != expected {a.expect_format!r}")
    if a.expect_int8_scale and fmt == "int8_tensorwise":
        s = sub.get(f"{layer}.weight_scale")
        kind = None if s is None else ("tensor" if s.numel() == 1 else "row" if tuple(s.shape) == (n, 1) else "?")
        if kind != a.expect_int8_scale:
            out.append(f"int8 scale {None if s is None else tuple(s.shape)} is not {a.expect_int8_scale}-wise")
    if a.expect_convrot_group is not None:
        g = conf.get("convrot_groupsize", conf.get("params", {}).get("convrot_groupsize"))
        on = conf.get("convrot", conf.get("params", {}).get("convrot")) or fmt == "convrot_w4a4"  # always rotated
        if not on or g is None or int(g) != a.expect_convrot_group:
            out.append(f"convrot={on!r} group={g!r}, expected convrot group {a.expect_convrot_group}")
    return out


def comfy_dtypes(load_device):
    """The (module dtype, compute dtype) comfy.sd.load_diffusion_model_state_dict picks for a quantized model."""
    unet_dtype = comfy.model_management.unet_dtype(model_params=0, supported_dtypes=INFERENCE_DTYPES, weight_dtype=None)
    manual_cast = comfy.model_management.unet_manual_cast(None, load_device, INFERENCE_DTYPES)
    return unet_dtype, manual_cast


class _QuantModelConfig:
    """What model_detection.model_config_from_unet attaches when detect_layer_quantization finds markers."""

    def __init__(self, quant_config):
        self.quant_config = quant_config


# ------------------------------------------------------------------------------------------------
# Part 1: per layer
# ------------------------------------------------------------------------------------------------
def check_layers(a, reader, sd, metadata, src_sd, cap, probs, stats):
    print(f"\n=== per-layer check, reader={reader} ===")
    sd = dict(sd)
    file_markers = markers_of(sd)
    header_layers = None
    if "_quantization_metadata" in metadata:
        qm = json.loads(metadata["_quantization_metadata"])
        header_layers = qm.get("layers", {})
        print(f"header _quantization_metadata: format_version={qm.get('format_version')!r}, {len(header_layers)} layers; "
              f"in-file .comfy_quant markers: {len(file_markers)}")
    else:
        print(f"header _quantization_metadata: absent; in-file .comfy_quant markers: {len(file_markers)}")
    if header_layers is not None and file_markers:
        # ComfyUI lets the header silently override a marker; a quant_core file must not depend on that.
        for layer in sorted(set(header_layers) | set(file_markers)):
            if header_layers.get(layer) != file_markers.get(layer):
                probs.add(LOAD, f"{reader}:{layer}: header conf {header_layers.get(layer)} != marker {file_markers.get(layer)}")
                print(f"  header/marker mismatch for {layer}: {header_layers.get(layer)} vs {file_markers.get(layer)}")

    sd, metadata = comfy.utils.convert_old_quants(sd, "", metadata=dict(metadata))
    markers = markers_of(sd)
    quant_config = comfy.utils.detect_layer_quantization(sd, "")
    if not markers or not quant_config:
        print("no quantized layers detected by ComfyUI")
        probs.add(LOAD, f"{reader}: no quantized layers")
        return
    for layer in sorted(markers):
        if f"{layer}.weight" not in sd:
            probs.add(LOAD, f"{reader}:{layer}: marker/header entry without {layer}.weight")
            print(f"  {layer}: marker/header entry without a weight")

    load_device = comfy.model_management.get_torch_device()
    unet_dtype, compute_dtype = comfy_dtypes(load_device)
    ops = comfy.ops.pick_operations(unet_dtype, compute_dtype, model_config=_QuantModelConfig(quant_config))
    print(f"detect_layer_quantization -> {quant_config}; device={load_device}; module dtype={unet_dtype}, "
          f"compute dtype={compute_dtype}; ops={ops.__name__}, emulated formats={sorted(getattr(ops, '_disabled', []))}")
    print(f"{'layer':36s} {'format':16s} {'shape':>11s} {'path':8s} {'fwd_rel':>8s} {'deq_rel':>8s} {'bound':>5s}  status")

    for layer in sorted(markers):
        conf = markers[layer]
        fmt = conf.get("format")
        bound = BOUNDS.get(fmt, DEFAULT_BOUND)
        sub = layer_tensors(sd, layer)
        wsrc, bsrc = src_sd.get(f"{layer}.weight"), src_sd.get(f"{layer}.bias")
        code, notes, path = OK, [], "-"
        fwd_rel = deq_rel = float("nan")
        shape = "?"

        def fail(c, msg):
            nonlocal code
            notes.append(msg)
            if _RANK[c] > _RANK[code]:
                code = c

        stage = "load"
        try:
            if fmt not in QUANT_ALGOS:
                raise ValueError(f"format {fmt!r} unknown to this ComfyUI (QUANT_ALGOS={sorted(QUANT_ALGOS)})")
            if wsrc is None or wsrc.dim() != 2:
                raise ValueError("no 2-D SRC weight with this name")
            n, k = wsrc.shape
            shape = f"{n}x{k}"
            for p in storage_problems(fmt, conf, sub, layer, n, k) + expectation_problems(a, fmt, conf, sub, layer, n):
                fail(LOAD, p)
            leaf = ops.Linear(k, n, bias=f"{layer}.bias" in sub, device=None, dtype=unet_dtype)
            root = tree_for(layer, leaf)
            n_log = len(cap.records)
            res = root.load_state_dict(sub, strict=False)  # BaseModel.load_model_weights: strict=False
            if res.missing_keys or res.unexpected_keys:
                fail(LOAD, f"missing={list(res.missing_keys)} unexpected={list(res.unexpected_keys)}")
            for msg in cap.since(n_log):
                fail(LOAD, f"comfy warning: {msg}")
            if a.expect_input_scale:
                fail_input_scale(leaf, sub.get(f"{layer}.input_scale"), fail)
            w = leaf.weight
            if not isinstance(w, QuantizedTensor):
                fail(LOAD, f"weight not quantized after load ({type(w).__name__})")
            elif w._layout_cls != QUANT_ALGOS[fmt]["comfy_tensor_layout"]:
                fail(LOAD, f"layout {w._layout_cls} != {QUANT_ALGOS[fmt]['comfy_tensor_layout']}")
            elif fmt == "convrot_w4a4":
                fail_w4a4_params(w._params, conf, a.expect_linear_dtype, fail)
            path = ("dequant" if getattr(leaf, "_full_precision_mm", False)
                    else "w-only" if not QUANT_ALGOS[fmt].get("quantize_input", True) else "q-act")

            stage = "forward"
            g = torch.Generator().manual_seed(a.seed + zlib.crc32(layer.encode()))
            x = torch.randn(2, a.tokens, k, generator=g).to(compute_dtype or unet_dtype)
            with torch.no_grad():
                y = leaf(x)
            ref = F.linear(x.float(), wsrc.float(), None if bsrc is None else bsrc.float())
            if tuple(y.shape) != tuple(ref.shape):
                raise ValueError(f"output shape {tuple(y.shape)} != {tuple(ref.shape)}")
            fwd_rel = rel(y, ref)
            stage = "dequantize"
            if isinstance(w, QuantizedTensor):  # used by ComfyUI for LoRA patching, emulation, requantize
                wd = w.dequantize()
                if tuple(wd.shape) != (n, k):
                    raise ValueError(f"dequantized shape {tuple(wd.shape)} != {(n, k)}")
                deq_rel = rel(wd, wsrc)
            for name, v in (("forward", fwd_rel), ("dequant", deq_rel)):
                if not math.isfinite(v) or v > bound:
                    fail(HIGH, f"{name} rel error {v:.4g} > {bound}")
        except Exception as e:  # noqa: BLE001
            fail(LOAD if stage == "load" else RUN, f"[{stage}] {type(e).__name__}: {str(e)[:300]}")
        if code != OK:
            probs.add(code, f"{reader}:{layer}")
        st = stats.setdefault((reader, fmt), [0, 0.0, 0.0])
        st[0] += 1
        st[1] = max(st[1], fwd_rel if fwd_rel == fwd_rel else math.inf)
        st[2] = max(st[2], deq_rel if deq_rel == deq_rel else math.inf)
        print(f"{layer:36s} {str(fmt):16s} {shape:>11s} {path:8s} {fwd_rel:8.5f} {deq_rel:8.5f} {bound:5.2f}  "
              f"{_NAME[code]}" + (f" {'; '.join(notes)}" if notes else " missing=[] unexpected=[]"))


def fail_w4a4_params(params, conf, expect_linear_dtype, fail):
    """convrot_w4a4: the marker's group size and linear dtype must reach the layout's params (ComfyUI reads them
    from the marker; a default in their place would rotate the activations by another matrix)."""
    want = (int(conf.get("convrot_groupsize", 256)), conf.get("linear_dtype", "int4"))
    got = (params.convrot_groupsize, params.linear_dtype)
    if got != want:
        fail(LOAD, f"loaded (convrot_groupsize, linear_dtype) {got} != marker {want}")
    if expect_linear_dtype and params.linear_dtype != expect_linear_dtype:
        fail(LOAD, f"linear_dtype {params.linear_dtype!r}, expected {expect_linear_dtype!r}")


def fail_input_scale(leaf, stored, fail):
    """--expect-input-scale: the file's static activation scale must arrive on the module unchanged."""
    loaded = getattr(leaf, "input_scale", None)
    if stored is None:
        fail(LOAD, "no input_scale in the file")
    elif loaded is None:
        fail(LOAD, "input_scale in the file but not on the loaded module")
    elif float(loaded) != float(stored):
        fail(LOAD, f"loaded input_scale {float(loaded)} != stored {float(stored)}")


# ------------------------------------------------------------------------------------------------
# Part 2: whole file through ComfyUI's diffusion-model loader
# ------------------------------------------------------------------------------------------------
def _parse_key_list(msg, head):
    try:
        return list(ast.literal_eval(msg[len(head):].strip()))
    except Exception:  # noqa: BLE001
        return [msg[len(head):].strip()]


def load_unet(path, reader, cap):
    """-> (model_patcher or None, warnings, error). Mirrors comfy.sd.load_diffusion_model."""
    n_log = len(cap.records)
    try:
        if reader == "safetensors":
            mp = comfy.sd.load_diffusion_model(path)  # the entry point itself (reads with the default reader)
        else:  # load_diffusion_model = load_torch_file + load_diffusion_model_state_dict; swap only the reader
            sd, metadata = read_file(path, reader)
            mp = comfy.sd.load_diffusion_model_state_dict(sd, metadata=metadata)
        err = None if mp is not None else "architecture not detected (load_diffusion_model_state_dict -> None)"
    except Exception as e:  # noqa: BLE001
        mp, err = None, f"{type(e).__name__}: {str(e)[:400]}"
        if "Could not detect model type" in str(e):
            err = "architecture not detected: " + err
    return mp, cap.since(n_log), err


def flux_inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    p = cfg.get("patch_size", 2)
    x = torch.randn(1, cfg["in_channels"], 8 * p, 8 * p, generator=g)
    ctx = torch.randn(1, 8, cfg["context_in_dim"], generator=g)
    kw = {}
    if cfg.get("vec_in_dim"):
        kw["y"] = torch.randn(1, cfg["vec_in_dim"], generator=g)
    if cfg.get("guidance_embed"):
        kw["guidance"] = torch.tensor([3.5])
    return x, torch.tensor([0.6]), ctx, kw


def check_unet(a, readers, cap, probs, unet_stats):
    print("\n=== whole-model check: comfy.sd.load_diffusion_model (ComfyUI's 'Load Diffusion Model' path) ===")
    src_mp, src_warn, src_err = load_unet(a.src, "safetensors", cap)
    if src_mp is None:
        msg = f"SRC not loadable as a ComfyUI diffusion model: {src_err}"
        print(("FAIL: " if a.unet == "require" else "SKIP: ") + msg)
        unet_stats["status"] = "src not loadable"
        if a.unet == "require":
            probs.add(LOAD, msg)
        return
    src_model = src_mp.model
    src_cfg = dict(src_model.model_config.unet_config)
    arch = f"{type(src_model.model_config).__name__} ({src_cfg.get('image_model', type(src_model.diffusion_model).__name__)})"
    print(f"SRC detected as {arch}, hidden_size={src_cfg.get('hidden_size')}, depth={src_cfg.get('depth')}/"
          f"{src_cfg.get('depth_single_blocks')}; warnings={src_warn or 'none'}")
    unet_stats["arch"] = arch
    src_dm = src_model.diffusion_model

    for reader in readers:
        mp, warns, err = load_unet(a.out, reader, cap)
        tag = f"unet[{reader}]"
        if mp is None:
            print(f"{tag}: FAIL {err}")
            probs.add(LOAD, f"{tag}: {err}")
            continue
        model, dm = mp.model, mp.model.diffusion_model
        cfg = dict(model.model_config.unet_config)
        q_arch = f"{type(model.model_config).__name__} ({cfg.get('image_model', type(dm).__name__)})"
        missing, unexpected, other = [], [], []
        for m in warns:
            if m.startswith("unet missing:"):
                missing += _parse_key_list(m, "unet missing:")
            elif m.startswith("unet unexpected:"):
                unexpected += _parse_key_list(m, "unet unexpected:")
            else:
                other.append(m)
        quant_config = getattr(model.model_config, "quant_config", None)
        print(f"{tag}: detected {q_arch}; quant_config={quant_config}; model dtype={model.get_dtype()}, "
              f"manual_cast={model.manual_cast_dtype}; unet missing={missing} unexpected={unexpected}")
        if q_arch != arch or {k: v for k, v in cfg.items() if k != "dtype"} != {k: v for k, v in src_cfg.items() if k != "dtype"}:
            probs.add(LOAD, f"{tag}: detected {q_arch} {cfg} != SRC {arch} {src_cfg}")
            print(f"  FAIL architecture/config differs from SRC: {cfg}")
        if missing or unexpected:
            probs.add(LOAD, f"{tag}: missing={missing} unexpected={unexpected}")
        for m in other:  # e.g. "Missing weight for layer ..."
            print(f"  FAIL comfy warning: {m}")
            probs.add(LOAD, f"{tag}: {m}")
        if not quant_config:
            probs.add(LOAD, f"{tag}: no mixed-precision quantization detected")

        # every marked layer must be a QuantizedTensor of its format's layout inside the model
        sd, md = read_file(a.out, reader)
        sd, _ = comfy.utils.convert_old_quants(dict(sd), "", metadata=dict(md))
        markers = markers_of(sd)
        n_qt = sum(isinstance(p, QuantizedTensor) for p in dm.parameters())
        bad, per_fmt = [], {}
        for layer, conf in sorted(markers.items()):
            fmt = conf.get("format")
            try:
                mod, ref_mod = dm.get_submodule(layer), src_dm.get_submodule(layer)
            except AttributeError:
                bad.append(f"{layer}: no such module in the model")
                continue
            w = getattr(mod, "weight", None)
            if not isinstance(w, QuantizedTensor) or w._layout_cls != QUANT_ALGOS.get(fmt, {}).get("comfy_tensor_layout"):
                bad.append(f"{layer}: weight is {type(w).__name__} {getattr(w, '_layout_cls', '')}")
                continue
            try:  # the module as the loaded model runs it vs. the same module of the SRC model
                k = ref_mod.weight.shape[1]
                g = torch.Generator().manual_seed(a.seed + 1 + zlib.crc32(layer.encode()))
                x = torch.randn(2, a.tokens, k, generator=g).to(model.get_dtype())
                with torch.no_grad():
                    r = rel(mod(x), ref_mod(x))
            except Exception as e:  # noqa: BLE001
                probs.add(RUN, f"{tag}:{layer}: forward {type(e).__name__}: {e}")
                print(f"  RUN-FAIL {layer}: {type(e).__name__}: {str(e)[:200]}")
                continue
            lst = per_fmt.setdefault(fmt, [])
            lst.append(r)
            if not math.isfinite(r) or r > BOUNDS.get(fmt, DEFAULT_BOUND):
                probs.add(HIGH, f"{tag}:{layer}: module rel error {r:.4g}")
                print(f"  HIGH {layer}: module rel error {r:.4g} > {BOUNDS.get(fmt, DEFAULT_BOUND)}")
        for b in bad:
            print(f"  FAIL {b}")
            probs.add(LOAD, f"{tag}: {b}")
        if n_qt != len(markers):
            probs.add(LOAD, f"{tag}: {n_qt} QuantizedTensor parameters in the model, {len(markers)} marked layers")
        print(f"{tag}: {n_qt} QuantizedTensor weights for {len(markers)} marked layers; in-model module rel error "
              + ", ".join(f"{f}: max {max(v):.5f} over {len(v)}" for f, v in sorted(per_fmt.items())))

        # full forward pass vs. the SRC model (Flux family: inputs derived from the detected config)
        if cfg.get("image_model") in ("flux", "chroma") and "in_channels" in cfg and "context_in_dim" in cfg:
            bound = max([BOUNDS.get(f, DEFAULT_BOUND) for f in per_fmt] or [DEFAULT_BOUND])
            try:
                x, t, ctx, kw = flux_inputs(cfg, a.seed)
                with torch.no_grad():
                    y = dm(x.to(model.get_dtype()), t, ctx.to(model.get_dtype()), **kw)
                    yr = src_dm(x.to(src_model.get_dtype()), t, ctx.to(src_model.get_dtype()), **kw)
                r = rel(y, yr)
                ok = math.isfinite(r) and r <= bound
                print(f"{tag}: full forward {tuple(x.shape)} -> {tuple(y.shape)}: rel error vs SRC model {r:.5f} "
                      f"(bound {bound}) {'OK' if ok else 'HIGH'}")
                unet_stats.setdefault("full_rel", {})[reader] = r
                if not ok:
                    probs.add(HIGH, f"{tag}: full forward rel error {r:.4g}")
            except Exception as e:  # noqa: BLE001
                probs.add(RUN, f"{tag}: full forward {type(e).__name__}: {e}")
                print(f"{tag}: full forward RUN-FAIL {type(e).__name__}: {str(e)[:300]}")
        else:
            print(f"{tag}: no full forward for image_model={cfg.get('image_model')!r} (only the Flux family is driven)")
        del mp, model, dm
    unet_stats["status"] = "checked"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="quantized .safetensors written by quant_core")
    ap.add_argument("src", help="the unquantized source .safetensors (same layer names)")
    ap.add_argument("--reader", choices=["both", "safetensors", "aimdo"], default="both",
                    help="ComfyUI's safetensors reader(s) to use (default both, compared bit for bit)")
    ap.add_argument("--unet", choices=["auto", "require", "off"], default="auto",
                    help="whole-model load through comfy.sd.load_diffusion_model: auto = skip if ComfyUI "
                         "can't load SRC as a diffusion model, require = that is a failure")
    ap.add_argument("--expect-format", help="every marked layer must have this ComfyUI format name")
    ap.add_argument("--expect-int8-scale", choices=["tensor", "row"], help="int8 weight_scale must be per-tensor/per-row")
    ap.add_argument("--expect-convrot-group", type=int,
                    help="int8 / convrot_w4a4 layers must be ConvRot with this group size")
    ap.add_argument("--expect-linear-dtype", choices=["int4", "int8"],
                    help="convrot_w4a4 layers must load with this linear_dtype")
    ap.add_argument("--expect-input-scale", action="store_true",
                    help="every marked layer has an input_scale that ComfyUI puts on the module unchanged")
    ap.add_argument("--bound", action="append", default=[], metavar="FMT=X", help="override an error bound")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true", help="echo ComfyUI's INFO log")
    a = ap.parse_args(argv)
    for b in a.bound:
        f, v = b.split("=", 1)
        BOUNDS[f] = float(v)

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):  # handlers installed while importing ComfyUI: ours below decides what is shown
        h.setLevel(logging.INFO if a.verbose else logging.ERROR)
    echo = logging.StreamHandler(sys.stdout)
    echo.setLevel(logging.INFO if a.verbose else logging.ERROR)
    echo.setFormatter(logging.Formatter("  [comfy %(levelname)s] %(message)s"))
    root.addHandler(echo)
    cap = LogCapture()
    root.addHandler(cap)

    probs = Problems()
    stats, unet_stats = {}, {}
    try:
        import comfyui_version  # top-level module of a ComfyUI checkout
    except ImportError:
        comfyui_version = None
    try:
        from importlib.metadata import version
        ck = version("comfy-kitchen")
    except Exception:  # noqa: BLE001
        ck = "?"
    print(f"ComfyUI {getattr(comfyui_version, '__version__', '?')} at {comfy.__path__[0]}, torch {torch.__version__}, "
          f"comfy_kitchen {ck}, formats {sorted(QUANT_ALGOS)}")

    readers = ["safetensors", "aimdo"] if a.reader == "both" else [a.reader]
    loaded = {}
    for r in readers:
        if r == "aimdo" and not _AIMDO_OK:
            print(f"load_torch_file[aimdo]: unavailable ({_AIMDO_ERR})")
            probs.add(LOAD, "aimdo reader unavailable")
            continue
        try:
            loaded[r] = read_file(a.out, r)
            print(f"load_torch_file[{r}]: {len(loaded[r][0])} tensors, header metadata keys {sorted(loaded[r][1])}")
        except Exception as e:  # noqa: BLE001
            print(f"load_torch_file[{r}]: FAIL {type(e).__name__}: {e}")
            probs.add(LOAD, f"load_torch_file[{r}]")
    if len(loaded) == 2:
        (s1, m1), (s2, m2) = loaded["safetensors"], loaded["aimdo"]
        diff = sorted(set(s1) ^ set(s2))
        neq = [k for k in s1 if k in s2 and not (
            s1[k].dtype == s2[k].dtype and s1[k].shape == s2[k].shape
            and torch.equal(s1[k].reshape(-1).view(torch.uint8), s2[k].reshape(-1).view(torch.uint8)))]
        if diff or neq or m1 != m2:
            print(f"READER MISMATCH: key diff {diff}, value diff {neq}, metadata equal {m1 == m2}")
            probs.add(LOAD, "reader mismatch")
        else:
            print("readers agree: safetensors reader == ComfyUI's mmap parser (tensors bit-identical, same metadata)")

    src_sd = comfy.utils.load_torch_file(a.src, safe_load=True)
    for r, (sd, md) in loaded.items():
        check_layers(a, r, sd, md, src_sd, cap, probs, stats)
    if a.unet != "off" and loaded:
        check_unet(a, list(loaded), cap, probs, unet_stats)

    print("\nsummary (max rel error per reader/format):")
    for (r, f), (cnt, fwd, deq) in sorted(stats.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"  {r:12s} {str(f):16s} layers={cnt:3d} fwd_rel<={fwd:.5f} deq_rel<={deq:.5f} bound={BOUNDS.get(f, DEFAULT_BOUND)}")
    if a.unet != "off":
        print(f"  whole model: {unet_stats.get('status', 'not run')}, arch={unet_stats.get('arch')}, "
              f"full forward rel={unet_stats.get('full_rel')}")
    code = probs.exit_code()
    if code == OK:
        print("RESULT: OK")
    else:
        shown = [w for _, w in probs.items[:20]]
        print(f"RESULT: {_NAME[code]} ({len(probs.items)} problems): {shown}{' ...' if len(probs.items) > 20 else ''}")
    return code


if __name__ == "__main__":
    sys.exit(main())
