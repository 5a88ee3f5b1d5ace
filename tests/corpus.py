"""A corpus of bad and edge-case inputs for the CLI, one small file (plus flags) per case.

Each case is a builder `build(directory) -> Built` registered with its expected outcome:

  ERROR     exit code 2, stderr is exactly one line starting with "error:" that names the file or layer
            (`mentions`) and says why (`why`, a regex), no "Traceback", and nothing in the case's directory is
            created, removed or changed (hidden temporary files included).
  OK        exit code 0, the output exists and `verify OUT --reference IN` passes; the only new file in the
            directory is the output.
  FALLBACK  as OK, and stdout mentions the layer (`mentions`) and why it was handled differently (`why`).

Files are written byte by byte where the case is about the container (headers, offsets, truncation) and with
safetensors' own writer where it is about the tensors. Pickle payloads are only ever written, never loaded.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save, save_file

ERROR, OK, FALLBACK = "ERROR", "OK", "FALLBACK"


@dataclass
class Built:
    argv: list[str]  # arguments after `python -m quant_core` (--no-progress is added by the runner)
    input: str  # the -i file: named by errors about the file, the reference for verify
    output: str | None = None  # where the converted file must appear (OK / FALLBACK)
    mentions: list[str] = field(default_factory=list)  # substrings the message must hold (file or layer names)
    extra_outputs: list[str] = field(default_factory=list)  # other files the run may create (reports)


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # ERROR | OK | FALLBACK
    why: str  # regex the error line (ERROR) or stdout (FALLBACK) must match; '' for OK
    build: Callable[[Path], Built]
    doc: str = ""


CASES: list[Case] = []


def case(name: str, expect: str, why: str = ""):
    def register(build):
        assert name not in {c.name for c in CASES}, name
        CASES.append(Case(name, expect, why, build, (build.__doc__ or "").strip()))
        return build
    return register


# --- helpers ------------------------------------------------------------------------------------------------------

LAYER = "blocks.0.attn.qkv"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_model(dtype=torch.bfloat16, n: int = 64, k: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """One quantizable layer with its bias and a norm: the smallest file a user would convert."""
    g = _gen(seed)
    return {f"{LAYER}.weight": (torch.randn(n, k, generator=g) * 0.02).to(dtype),
            f"{LAYER}.bias": (torch.randn(n, generator=g) * 0.01).to(dtype),
            "blocks.0.norm.scale": torch.ones(n, dtype=dtype)}


def good_bytes() -> bytes:
    return save(small_model(), metadata={"modelspec.title": "corpus"})


def split(blob: bytes) -> tuple[int, bytes, bytes]:
    """(header length, header bytes, data bytes) of a safetensors blob."""
    n = int.from_bytes(blob[:8], "little")
    return n, blob[8:8 + n], blob[8 + n:]


def raw_file(header, data: bytes, length: int | None = None) -> bytes:
    """A safetensors-shaped blob: 8-byte little-endian length, header (object → compact JSON, or raw bytes), data.
    `length` overrides the length prefix (to make it lie)."""
    blob = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return (len(blob) if length is None else length).to_bytes(8, "little") + blob + data


def f32_data(n: int, seed: int = 0) -> bytes:
    return (torch.randn(n, generator=_gen(seed)) * 0.02).numpy().tobytes()


def entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def one_layer_header(**changes) -> tuple[dict, bytes]:
    """A valid header for one F32 [16,16] weight (1024 bytes) with fields replaced by `changes`."""
    e = entry("F32", [16, 16], 0, 1024)
    e.update(changes)
    return {f"{LAYER}.weight": e}, f32_data(256)


def write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.write_bytes(data)
    return str(path)


def save_model(directory: Path, tensors: dict, name: str = "model.safetensors", metadata=None) -> str:
    path = directory / name
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def bad_file(directory: Path, data: bytes, name: str = "model.safetensors", flags=()) -> Built:
    path = write(directory, name, data)
    return Built(["-i", path, "-o", str(directory / "out.safetensors"), *flags], path, mentions=[name])


def convert(directory: Path, tensors: dict, flags=(), mentions=(), name: str = "model.safetensors") -> Built:
    path = save_model(directory, tensors, name)
    out = str(directory / "out.safetensors")
    return Built(["-i", path, "-o", out, *flags], path, out, list(mentions) or [name])


def with_weight(extra: dict, seed: int = 1) -> dict:
    """`extra` tensors next to one ordinary quantizable layer, so the run has work to do."""
    return {**small_model(seed=seed), **extra}


# --- not safetensors at all ---------------------------------------------------------------------------------------

FILE_WHY = r"not a safetensors|too short|truncated|malformed"


@case("text file", ERROR, FILE_WHY)
def _(d):
    return bad_file(d, b"This is a README, not a model.\n" * 40)


@case("random bytes", ERROR, FILE_WHY)
def _(d):
    data = bytes(torch.randint(0, 256, (4096,), generator=_gen(7), dtype=torch.uint8).tolist())
    return bad_file(d, b"\x13" + data[1:])  # first byte fixed: never 0x80 (the pickle check is its own case)


@case("zero bytes", ERROR, r"not a safetensors|empty|0 bytes")
def _(d):
    return bad_file(d, b"")


@case("7 bytes", ERROR, r"not a safetensors|too short|7 bytes")
def _(d):
    return bad_file(d, b"\x10\x00\x00\x00\x00\x00\x00")


# --- truncated at many offsets ----------------------------------------------------------------------------------

@case("truncated inside the length prefix", ERROR, r"not a safetensors|too short|truncated")
def _(d):
    return bad_file(d, good_bytes()[:4])


@case("truncated inside the header", ERROR, r"truncated")
def _(d):
    blob = good_bytes()
    n, _, _ = split(blob)
    return bad_file(d, blob[:8 + n // 2])


@case("truncated at the data start", ERROR, r"truncated")
def _(d):
    blob = good_bytes()
    n, _, _ = split(blob)
    return bad_file(d, blob[:8 + n])


@case("truncated mid-tensor", ERROR, r"truncated")
def _(d):
    blob = good_bytes()
    n, _, data = split(blob)
    return bad_file(d, blob[:8 + n + len(data) // 2])


@case("truncated one byte short", ERROR, r"truncated")
def _(d):
    return bad_file(d, good_bytes()[:-1])


# --- the length prefix lies -------------------------------------------------------------------------------------

@case("header length too large (runs into the data)", ERROR, r"malformed|header")
def _(d):
    _, header, data = split(good_bytes())
    return bad_file(d, raw_file(header, data, length=len(header) + 16))


@case("header length too small", ERROR, r"malformed|header")
def _(d):
    _, header, data = split(good_bytes())
    return bad_file(d, raw_file(header, data, length=len(header) - 10))


@case("header length zero", ERROR, r"not a safetensors|header length 0|empty header")
def _(d):
    _, header, data = split(good_bytes())
    return bad_file(d, raw_file(header, data, length=0))


@case("header length over 100 MB", ERROR, r"100 MB|limit|too large|exceeds")
def _(d):
    """The file really is that large (sparse): not truncated, only the 100 MB header limit can refuse it, and the
    message should say so."""
    length = 101 * 1024 * 1024
    path = d / "model.safetensors"
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little") + b"{")
        f.truncate(8 + length + 1024)
    return Built(["-i", str(path), "-o", str(d / "out.safetensors")], str(path), mentions=["model.safetensors"])


# --- header JSON malformed ----------------------------------------------------------------------------------------

JSON_WHY = r"malformed|header"


@case("header JSON syntax error", ERROR, JSON_WHY)
def _(d):
    header, data = one_layer_header()
    blob = json.dumps(header).encode().replace(b'"dtype":', b'"dtype"', 1)
    return bad_file(d, raw_file(blob, data))


@case("header JSON is a string", ERROR, JSON_WHY)
def _(d):
    return bad_file(d, raw_file(b'"just a string"', b""))


@case("header JSON is a list", ERROR, JSON_WHY)
def _(d):
    header, data = one_layer_header()
    return bad_file(d, raw_file(json.dumps([header]).encode(), data))


@case("header JSON nested 100000 deep", ERROR, JSON_WHY)
def _(d):
    return bad_file(d, raw_file(b"[" * 100000 + b"]" * 100000, b""))


@case("header not UTF-8", ERROR, JSON_WHY)
def _(d):
    header, data = one_layer_header()
    blob = json.dumps(header).encode().replace(b"blocks", b"bl\xff\xfecks", 1)
    return bad_file(d, raw_file(blob, data))


@case("__metadata__ is not an object", ERROR, r"__metadata__")
def _(d):
    header, data = one_layer_header()
    return bad_file(d, raw_file({"__metadata__": ["a", "b"], **header}, data))


@case("__metadata__ values are not strings", ERROR, r"__metadata__")
def _(d):
    header, data = one_layer_header()
    return bad_file(d, raw_file({"__metadata__": {"steps": 1000, "nested": {"a": "b"}}, **header}, data))


@case("tensor entry without data_offsets", ERROR, r"malformed")
def _(d):
    header, data = one_layer_header()
    del header[f"{LAYER}.weight"]["data_offsets"]
    return bad_file(d, raw_file(header, data))


# --- tensor entries that lie ---------------------------------------------------------------------------------------

@case("unknown dtype", ERROR, r"unknown dtype")
def _(d):
    header, data = one_layer_header(dtype="F12")
    b = bad_file(d, raw_file(header, data))
    b.mentions.append(LAYER)
    return b


@case("offsets overlap", ERROR, r"overlap")
def _(d):
    header, data = one_layer_header(shape=[8, 16], data_offsets=[0, 512])
    header[f"{LAYER}.bias"] = entry("F32", [128], 256, 768)
    return bad_file(d, raw_file(header, data))


@case("offsets out of range", ERROR, r"truncated|out of range|beyond|ends at")
def _(d):
    header, data = one_layer_header()
    header[f"{LAYER}.bias"] = entry("F32", [16], 4096, 4160)
    return bad_file(d, raw_file(header, data))


@case("offsets reversed (end < start)", ERROR, r"offsets")
def _(d):
    header, data = one_layer_header(data_offsets=[1024, 0])
    return bad_file(d, raw_file(header, data))


@case("negative offsets", ERROR, r"offsets")
def _(d):
    header, data = one_layer_header(data_offsets=[-4, 1020])
    return bad_file(d, raw_file(header, data))


@case("non-integer offsets", ERROR, r"offsets")
def _(d):
    header, data = one_layer_header(data_offsets=[0.0, 1024.0])
    return bad_file(d, raw_file(header, data))


@case("boolean offsets", ERROR, r"offsets")
def _(d):
    """JSON true/false are not offsets, even though Python treats them as 1/0."""
    header = {"blocks.0.norm.scale": entry("U8", [1], False, True)}
    header.update(one_layer_header(data_offsets=[1, 1025])[0])
    return bad_file(d, raw_file(header, b"\x01" + f32_data(256)))


@case("float shape", ERROR, r"shape")
def _(d):
    header, data = one_layer_header(shape=[16.0, 16])
    return bad_file(d, raw_file(header, data))


@case("boolean in shape", ERROR, r"shape")
def _(d):
    """[true, 256] is not a shape, even though Python reads true as 1."""
    header, data = one_layer_header(shape=[True, 256])
    return bad_file(d, raw_file(header, data))


@case("negative shape", ERROR, r"shape")
def _(d):
    header, data = one_layer_header(shape=[-16, -16])
    return bad_file(d, raw_file(header, data))


@case("shape disagrees with byte count", ERROR, r"needs|bytes|shape")
def _(d):
    header, data = one_layer_header(shape=[16, 8])
    return bad_file(d, raw_file(header, data))


@case("absurd shape (10^20 x 10^20)", ERROR, r"needs|bytes|shape")
def _(d):
    header, data = one_layer_header(shape=[10 ** 20, 10 ** 20])
    return bad_file(d, raw_file(header, data))


@case("duplicate keys", ERROR, r"duplicate")
def _(d):
    header, data = one_layer_header()
    blob = json.dumps(header).encode()
    inner = blob[1:-1]
    return bad_file(d, raw_file(b"{" + inner + b"," + inner + b"}", data))


@case("header padded with spaces", OK)
def _(d):
    """Trailing whitespace in the header is legal JSON and what aligned writers produce."""
    _, header, data = split(good_bytes())
    path = write(d, "model.safetensors", raw_file(header + b" " * 37, data))
    return Built(["-i", path, "-o", str(d / "out.safetensors")], path, str(d / "out.safetensors"))


# --- tensor values ------------------------------------------------------------------------------------------------

@case("NaN weights", ERROR, r"NaN")
def _(d):
    t = small_model(torch.float32)
    t[f"{LAYER}.weight"][5, 7] = float("nan")
    return convert(d, t, mentions=[LAYER])


@case("Inf weights", ERROR, r"NaN/Inf|Inf")
def _(d):
    t = small_model(torch.bfloat16)
    t[f"{LAYER}.weight"][0, :] = float("-inf")
    return convert(d, t, mentions=[LAYER])


@case("NaN weights with --allow-nonfinite", FALLBACK, r"NaN")
def _(d):
    t = with_weight({"blocks.1.mlp.weight": torch.full((32, 32), float("nan"))})
    return convert(d, t, ["--allow-nonfinite"], mentions=["blocks.1.mlp"])


@case("denormal weights (whole layer)", OK)
def _(d):
    t = with_weight({"blocks.1.mlp.weight": torch.randn(32, 32, generator=_gen(3)) * 1e-40})
    return convert(d, t)


@case("denormal weights (mixed in)", OK)
def _(d):
    t = small_model(torch.float32)
    t[f"{LAYER}.weight"][::2, ::3] = 1e-41
    return convert(d, t)


@case("all-zero weights", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.mlp.weight": torch.zeros(32, 32, dtype=torch.bfloat16)}))


@case("all-zero weights nvfp4", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.mlp.weight": torch.zeros(32, 32, dtype=torch.bfloat16)}), ["--nvfp4"])


@case("huge magnitudes (3e38, fp32)", OK)
def _(d):
    t = small_model(torch.float32)
    t[f"{LAYER}.weight"] = torch.randn(64, 64, generator=_gen(4)).clamp(-1, 1) * 3e38
    return convert(d, t)


@case("F64 and F16 weights", OK)
def _(d):
    return convert(d, {"a.lin.weight": torch.randn(32, 32, dtype=torch.float64) * 0.02,
                       "b.lin.weight": (torch.randn(32, 32) * 0.02).half()})


# --- shapes ------------------------------------------------------------------------------------------------------

@case("1-element 2-D weight [1,1]", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.tiny.weight": torch.tensor([[0.25]])}))


@case("0-sized weight [0,64]", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.empty.weight": torch.zeros(0, 64)}))


@case("0-sized weight [64,0]", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.empty.weight": torch.zeros(64, 0)}))


@case("0-D and 1-D weights", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.gate.weight": torch.tensor(0.5), "blocks.1.norm.weight": torch.ones(64)}))


@case("3-D weight kept", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.experts.weight": torch.randn(4, 16, 16)}))


@case("4-D conv weight kept", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.conv.weight": torch.randn(8, 4, 3, 3)}))


@case("5-D weight kept", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.conv3d.weight": torch.randn(4, 2, 3, 3, 3)}))


@case("huge K tiny N [1,65536]", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.wide.weight": torch.randn(1, 65536, generator=_gen(5)) * 0.02}))


@case("tall N tiny K [8192,1]", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.tall.weight": torch.randn(8192, 1, generator=_gen(6)) * 0.02}), ["--fp8"])


@case("int8 block 128 on [64,256]", FALLBACK, r"does not fit.*fell back|fell back")
def _(d):
    t = {"blocks.1.mlp.weight": torch.randn(64, 256, generator=_gen(8)) * 0.02, "blocks.1.mlp.bias": torch.zeros(64)}
    return convert(d, t, ["--int8", "--scaling_mode", "block", "--block_size", "128"], mentions=["blocks.1.mlp"])


@case("fp8 block 128 on [64,256]", FALLBACK, r"does not fit.*fell back|fell back")
def _(d):
    t = {"blocks.1.mlp.weight": torch.randn(64, 256, generator=_gen(8)) * 0.02}
    return convert(d, t, ["--fp8", "--scaling_mode", "block"], mentions=["blocks.1.mlp"])


@case("nvfp4 on [33,47]", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.odd.weight": torch.randn(33, 47, generator=_gen(9)) * 0.02}), ["--nvfp4"])


@case("mxfp8 on [31,33]", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.odd.weight": torch.randn(31, 33, generator=_gen(9)) * 0.02}), ["--mxfp8"])


@case("fp8 on [33,47]", OK)
def _(d):
    return convert(d, with_weight({"blocks.1.odd.weight": torch.randn(33, 47, generator=_gen(9)) * 0.02}), ["--fp8"])


@case("convrot with K=100", FALLBACK, r"ConvRot|not a multiple")
def _(d):
    t = with_weight({"blocks.1.odd.weight": torch.randn(64, 100, generator=_gen(10)) * 0.02})
    return convert(d, t, ["--convrot", "--convrot-group-size", "16"], mentions=["blocks.1.odd"])


# --- nothing to quantize ------------------------------------------------------------------------------------------

@case("only biases and norms", ERROR, r"no quantizable layer")
def _(d):
    return convert(d, {"a.bias": torch.ones(8), "a.norm.weight": torch.ones(8), "pos_ids": torch.arange(8)})


@case("already-FP8 weights only", ERROR, r"no quantizable layer|already")
def _(d):
    return convert(d, {"a.lin.weight": torch.randn(16, 16).to(torch.float8_e4m3fn)})


@case("empty model {}", ERROR, r"no tensors|empty")
def _(d):
    return convert(d, {})


@case("--exclude-layers excludes everything", ERROR, r"no quantizable layer")
def _(d):
    return convert(d, small_model(), ["--exclude-layers", "."])


@case("weight_scale already beside a float weight", ERROR, r"weight_scale|already|collide|twice")
def _(d):
    """A float weight that comes with its own `.weight_scale` (a half-converted or dequantized checkpoint): the
    quantized layer would need the same name."""
    b = convert(d, with_weight({"blocks.1.lin.weight": torch.randn(16, 16) * 0.02,
                                "blocks.1.lin.weight_scale": torch.ones(16, 1)}))
    b.output, b.mentions = None, ["blocks.1.lin"]
    return b


# --- layer configs -------------------------------------------------------------------------------------------------

def _with_config(d: Path, text: str, name: str = "rules.json") -> Built:
    config = d / name
    config.write_text(text)
    b = convert(d, small_model(), ["--layer-config", str(config)])
    return b


@case("layer-config names layers that do not exist", FALLBACK, r"matched no layer")
def _(d):
    b = _with_config(d, json.dumps({"rules": [{"match": "double_blocks\\.99\\.", "format": "fp8"}]}))
    b.mentions = ["double_blocks"]
    return b


@case("layer-config with a trailing comma", ERROR, r"malformed layer config JSON|JSON")
def _(d):
    b = _with_config(d, '{"rules": [{"match": "attn", "format": "fp8"},]}')
    b.output, b.mentions = None, ["rules.json"]
    return b


@case("layer-config is a list", ERROR, r"layer config")
def _(d):
    b = _with_config(d, json.dumps([{"match": "attn", "format": "fp8"}]))
    b.output, b.mentions = None, ["rules.json"]
    return b


@case("layer-config with an unknown format", ERROR, r"unknown format")
def _(d):
    b = _with_config(d, json.dumps({"rules": [{"match": "attn", "format": "int3"}]}))
    b.output, b.mentions = None, ["rules.json", "rule 0"]
    return b


# --- pickles and other containers ---------------------------------------------------------------------------------

PICKLE_WHY = r"pickle|refused"


@case("pickle disguised as .safetensors", ERROR, PICKLE_WHY)
def _(d):
    return bad_file(d, pickle.dumps({"state_dict": {"w": [0.1, 0.2, 0.3]}}, protocol=4))


@case("protocol-0 pickle disguised as .safetensors", ERROR, r"pickle|refused|not a safetensors")
def _(d):
    return bad_file(d, pickle.dumps({"state_dict": {"w": [0.1, 0.2, 0.3]}}, protocol=0))


@case("torch.save zip renamed .safetensors", ERROR, PICKLE_WHY)
def _(d):
    buf = io.BytesIO()
    torch.save({"w": torch.randn(4, 4)}, buf)
    return bad_file(d, buf.getvalue())


@case(".ckpt file", ERROR, PICKLE_WHY)
def _(d):
    return bad_file(d, pickle.dumps({"state_dict": {}}, protocol=2), name="model.ckpt")


@case(".pt file", ERROR, PICKLE_WHY)
def _(d):
    buf = io.BytesIO()
    torch.save({"w": torch.randn(4, 4)}, buf)
    return bad_file(d, buf.getvalue(), name="model.pt")


@case(".bin file (safetensors bytes inside)", ERROR, PICKLE_WHY)
def _(d):
    return bad_file(d, good_bytes(), name="pytorch_model.bin")


# --- already quantized --------------------------------------------------------------------------------------------

@case("already-quantized input (own output fed back)", ERROR, r"already quantized")
def _(d):
    import quant_core
    src = save_model(d, small_model(), "src.safetensors")
    quantized = str(d / "src_int8.safetensors")
    quant_core.quantize(input=src, output=quantized, verify="off", progress=False)
    return Built(["-i", quantized, "-o", str(d / "twice.safetensors")], quantized, mentions=["src_int8.safetensors"])


@case("already-quantized header without markers", ERROR, r"already quantized(?!.*comfy_quant markers)")
def _(d):
    """Only the `_quantization_metadata` header says so (what ComfyUI <= 0.3.7x reads); the message must not claim
    markers the file does not have."""
    path = save_model(d, small_model(), metadata={"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {LAYER: {"format": "int8_tensorwise"}}})})
    return Built(["-i", path, "-o", str(d / "out.safetensors")], path, mentions=["model.safetensors"])


# --- LoRAs --------------------------------------------------------------------------------------------------------

def _lora(d, tensors, name="lora.safetensors") -> str:
    path = str(d / name)
    save_file(tensors, path)
    return path


@case("LoRA for another model (unmatched modules)", ERROR, r"match no weight.*detected style: kohya")
def _(d):
    path = save_model(d, small_model())
    lora = _lora(d, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 32),
                     "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(32, 4)})
    return Built(["-i", path, "-o", str(d / "out.safetensors"), "--merge-lora", lora], path,
                 mentions=["lora_te1_text_model_encoder_layers_0_mlp_fc1"])


@case("LoRA with mismatched shapes", ERROR, r"delta of shape \[64, 32\] but blocks.0.attn.qkv.weight has shape \[64, 64\]")
def _(d):
    path = save_model(d, small_model())
    lora = _lora(d, {"lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.randn(4, 32),
                     "lora_unet_blocks_0_attn_qkv.lora_up.weight": torch.randn(64, 4)})
    return Built(["-i", path, "-o", str(d / "out.safetensors"), "--merge-lora", lora], path, mentions=["lora.safetensors"])


@case("LoRA with NaN", ERROR, r"NaN/Inf")
def _(d):
    path = save_model(d, small_model())
    up = torch.randn(64, 4)
    up[0, 0] = float("nan")
    lora = _lora(d, {"lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.randn(4, 64),
                     "lora_unet_blocks_0_attn_qkv.lora_up.weight": up})
    return Built(["-i", path, "-o", str(d / "out.safetensors"), "--merge-lora", lora], path, mentions=["lora.safetensors"])


@case("LoRA that is a pickle", ERROR, r"refused")
def _(d):
    path = save_model(d, small_model())
    lora = d / "lora.safetensors"
    lora.write_bytes(pickle.dumps({"lora_up": [1.0, 2.0]}, protocol=4))
    return Built(["-i", path, "-o", str(d / "out.safetensors"), "--merge-lora", str(lora)], path,
                 mentions=["lora.safetensors"])


@case("LoRA merged, then quantized", OK)
def _(d):
    path = save_model(d, small_model())
    lora = _lora(d, {"lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.randn(4, 64) * 0.01,
                     "lora_unet_blocks_0_attn_qkv.lora_up.weight": torch.randn(64, 4) * 0.01,
                     "lora_unet_blocks_0_attn_qkv.alpha": torch.tensor(4.0)})
    return Built(["-i", path, "-o", str(d / "out.safetensors"), "--merge-lora", lora], path,
                 output=str(d / "out.safetensors"))


# --- input and output paths ----------------------------------------------------------------------------------------

@case("input missing", ERROR, r"cannot read|No such file|does not exist|not found")
def _(d):
    path = str(d / "missing.safetensors")
    return Built(["-i", path, "-o", str(d / "out.safetensors")], path, mentions=["missing.safetensors"])


@case("input is a directory", ERROR, r"directory|cannot read")
def _(d):
    (d / "model.safetensors").mkdir()
    path = str(d / "model.safetensors")
    return Built(["-i", path, "-o", str(d / "out.safetensors")], path, mentions=["model.safetensors"])


@case("output path equals input", ERROR, r"equals the input")
def _(d):
    path = save_model(d, small_model())
    return Built(["-i", path, "-o", path], path, mentions=["model.safetensors"])


@case("output is a symlink to the input", ERROR, r"equals the input|same file")
def _(d):
    path = save_model(d, small_model())
    os.symlink(path, d / "link.safetensors")
    return Built(["-i", path, "-o", str(d / "link.safetensors")], path, mentions=["link.safetensors"])


@case("output directory missing", ERROR, r"does not exist")
def _(d):
    path = save_model(d, small_model())
    return Built(["-i", path, "-o", str(d / "nope" / "out.safetensors")], path, mentions=["nope"])


@case("output exists, no --overwrite", ERROR, r"--overwrite")
def _(d):
    path = save_model(d, small_model())
    (d / "out.safetensors").write_bytes(b"precious")
    return Built(["-i", path, "-o", str(d / "out.safetensors")], path, mentions=["out.safetensors"])


@case("output is an existing directory, --overwrite", ERROR, r"directory|exists")
def _(d):
    path = save_model(d, small_model())
    (d / "out.safetensors").mkdir()
    return Built(["-i", path, "-o", str(d / "out.safetensors"), "--overwrite"], path, mentions=["out.safetensors"])


@case("--report into a missing directory", ERROR, r"does not exist|cannot write|No such file")
def _(d):
    path = save_model(d, small_model())
    return Built(["-i", path, "-o", str(d / "out.safetensors"), "--report", str(d / "nope" / "r.json")], path,
                 mentions=["r.json"])


@case("--block_size 0", ERROR, r"block.size")
def _(d):
    path = save_model(d, small_model())
    return Built(["-i", path, "-o", str(d / "out.safetensors"), "--int8", "--scaling_mode", "block", "--block_size",
                  "0"], path, mentions=["block"])


@case("default output name next to the input", OK)
def _(d):
    path = save_model(d, small_model(), "tiny model.safetensors")
    return Built(["-i", path, "--fp8"], path, str(d / "tiny model_simple_fp8.safetensors"))


@case("unicode tensor names and metadata", OK)
def _(d):
    t = {"blöcks.0.attn.qkv_ü.weight": torch.randn(32, 32) * 0.02, "blöcks.0.norm.scale": torch.ones(32)}
    path = save_model(d, t, metadata={"title": "模型 ✓", "empty": ""})
    return Built(["-i", path, "-o", str(d / "out.safetensors")], path, str(d / "out.safetensors"))


@case("non-float tensors beside a layer", OK)
def _(d):
    return convert(d, with_weight({"ids.position": torch.arange(16), "mask.flag": torch.ones(5, dtype=torch.bool),
                                   "lut.table": torch.arange(7, dtype=torch.uint8)}))
