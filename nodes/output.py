"""Save Quantized (streams the plan through the engine into a new file) and Verify Quantized.

Both return their report in the node's `ui` output under `quant_report`; the web extension draws it, and API
clients read the same dict from /history. Nothing here depends on the browser.
"""
from __future__ import annotations

import math
import os
from collections import Counter

from comfy_api.latest import io

from .. import quant_core
from ..quant_core import KEEP, QUANTIZE, QuantError
from . import paths
from .recipe import QuantRecipe, require_plan
from .types import CATEGORY, QuantPlan

VERIFY_LEVELS = ["cheap", "full"]
NO_REFERENCE = "none"
NO_FILE = "none"


class SaveQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCoreSaveQuantized",
            display_name="Save Quantized",
            category=CATEGORY,
            description="Runs the plan: streams the source layer by layer (merging LoRAs, quantizing), writes a new "
                        ".safetensors atomically (no partial file on error or cancel), verifies it, and shows the "
                        "per-layer quality. The file loads with ComfyUI's stock loaders.",
            inputs=[
                QuantPlan.Input("plan", tooltip="The plan from a Quantize node."),
                io.String.Input("filename_prefix", default="quantized/model",
                                tooltip="File name prefix, may contain sub-folders; a counter is appended "
                                        "(model_00001_.safetensors). It cannot leave the destination folder."),
                io.Combo.Input("destination", options=list(paths.SAVE_DESTINATIONS), default="output",
                               tooltip="output: ComfyUI's output folder; a model folder makes the file appear in the "
                                       "matching loader (diffusion_models → Load Diffusion Model) after a refresh."),
                io.Combo.Input("verify", options=VERIFY_LEVELS, default="cheap",
                               tooltip="cheap: every layout and marker rule ComfyUI relies on; full: also compares "
                                       "every layer with the source (slower, reads the source twice)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Absolute path of the saved file.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix, destination, verify):
        if destination not in paths.SAVE_DESTINATIONS:
            return f"destination {destination!r}: choose from {', '.join(paths.SAVE_DESTINATIONS)}"
        if verify not in VERIFY_LEVELS:
            return f"verify {verify!r}: choose from {', '.join(VERIFY_LEVELS)}"
        if not filename_prefix.strip() or os.path.isabs(filename_prefix) or ".." in filename_prefix.replace("\\", "/").split("/"):
            return f"filename_prefix {filename_prefix!r}: give a relative name inside the destination folder"
        return True

    @classmethod
    def execute(cls, plan: QuantRecipe, filename_prefix, destination, verify) -> io.NodeOutput:
        problem = cls.validate_inputs(filename_prefix, destination, verify)
        if problem is not True:
            raise ValueError(problem)
        from .progress import layer_progress
        plan = require_plan(plan)
        path, display = paths.save_path(filename_prefix, destination)
        try:
            job = plan.job(verify=verify)
            result = quant_core.convert(plan.open_source(), path, job, on_layer=layer_progress())
        except QuantError as e:
            raise ValueError(str(e)) from None
        report = conversion_report(result, display, plan)
        return io.NodeOutput(result.output, ui={"quant_report": [report], "text": [report["summary"]]})


class VerifyQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCoreVerifyQuantized",
            display_name="Verify Quantized",
            category=CATEGORY,
            description="Checks a quantized .safetensors against everything ComfyUI's loader relies on (markers, "
                        "header metadata, shapes, dtypes, scales); with a reference, also measures every layer's "
                        "error against the original weights and charts it.",
            inputs=[
                io.Combo.Input("file", options=[NO_FILE, *paths.list_files(paths.VERIFY_FOLDERS)], default=NO_FILE,
                               tooltip="A quantized file from the output or model folders (ignored when 'path' is "
                                       "connected)."),
                io.Combo.Input("reference", options=[NO_REFERENCE, *paths.list_files(paths.SOURCE_FOLDERS)],
                               default=NO_REFERENCE,
                               tooltip="The original checkpoint, to measure each layer's error (none = layout checks "
                                       "only)."),
                io.String.Input("path", optional=True, force_input=True,
                                tooltip="Connect Save Quantized's path output to verify the file it just wrote."),
            ],
            outputs=[io.String.Output(display_name="summary", tooltip="One line: OK or the number of defects.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, file, reference):
        try:
            if file != NO_FILE:
                paths.resolve(file, paths.VERIFY_FOLDERS)
            if reference != NO_REFERENCE:
                paths.resolve(reference, paths.SOURCE_FOLDERS)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, file, reference, path=None) -> io.NodeOutput:
        if not path and file == NO_FILE:
            raise ValueError("Verify Quantized: choose a file, or connect Save Quantized's path output")
        target = paths.confine(path, paths.VERIFY_FOLDERS) if path else paths.resolve(file, paths.VERIFY_FOLDERS)
        source = None if reference == NO_REFERENCE else paths.resolve(reference, paths.SOURCE_FOLDERS)
        from .progress import check_interrupted
        try:
            result = quant_core.verify_file(target, reference=source, allow_legacy=True, on_layer=check_interrupted)
        except QuantError as e:
            raise ValueError(str(e)) from None
        report = verification_report(result, paths.display_name(target, paths.VERIFY_FOLDERS))
        return io.NodeOutput(result.summary(), ui={"quant_report": [report], "text": [result.summary()]})


def conversion_report(result, display: str, plan: QuantRecipe) -> dict:
    """What the web chart and API clients read after Save Quantized (JSON-safe: no inf/NaN)."""
    order = {d.layer: i for i, d in enumerate(result.plan.of(QUANTIZE))}
    layers = sorted(result.report.layers, key=lambda s: order.get(s.layer, len(order)))
    verification = result.verify
    return {
        "kind": "save", "file": display, "path": result.output, "steps": plan.describe(),
        "size_before": result.input_bytes, "size_after": result.output_bytes, "seconds": round(result.seconds, 2),
        "peak_gpu_bytes": result.peak_gpu_bytes,  # None: it ran on the CPU
        "formats": dict(Counter(s.format for s in layers)),
        "kept": sum(1 for d in result.plan.of(KEEP) if d.key.endswith(".weight")),
        "threshold_db": result.report.threshold_db,  # one level for all layers, or None: each layer's format's own
        "mean_sqnr_db": _finite(result.report.mean_sqnr()),
        "summary": result.report.summary(),  # says whether output figures are held-out or in-sample
        "output_sqnr_basis": result.report.output_basis(),  # "held-out", "in-sample", "mixed" or None
        "method_layers": result.report.to_json()["method_layers"],  # kept vs round-to-nearest (JSON-safe)
        "runtime": result.report.to_json()["runtime"],  # per GPU class: as computed vs weights only (JSON-safe)
        "auto": result.report.to_json().get("auto"),  # Quantize Auto: every layer's choice, predicted and measured
        "layers": [_layer(s, result.report.threshold_of(s)) for s in layers],
        "verify": _verify_dict(verification),
        "lora": None if result.lora is None else result.lora.summary(),
        "notes": plan.notes + result.notes,
    }


def _layer(s, threshold_db: float) -> dict:
    """One bar of the chart: weights only (`sqnr_db`, flagged under `threshold_db`) and, where the GPU class
    quantizes activations, as computed there (`runtime_sqnr_db`, flagged under `runtime_threshold_db`)."""
    return {"name": s.layer, "format": s.format, "sqnr_db": _finite(s.sqnr_db), "method_kept": s.method_kept,
            "threshold_db": threshold_db, "runtime_sqnr_db": _finite(s.runtime_sqnr_db),
            "runtime_weights_db": _finite(s.runtime_weights_db), "runtime_threshold_db": s.runtime_threshold_db,
            "runtime_gpu": s.runtime_gpu}


def verification_report(result, display: str) -> dict:
    layers = [{"name": c.layer, "format": c.format,
               "sqnr_db": None if c.rel_error is None else _finite(quant_core.sqnr_from_rel_error(c.rel_error)),
               "threshold_db": quant_core.warn_below_db(c.format)}
              for c in result.layers]
    measured = [l["sqnr_db"] for l in layers if isinstance(l["sqnr_db"], float)]
    return {
        "kind": "verify", "file": display, "path": result.path, "size_after": os.path.getsize(result.path),
        "formats": dict(Counter(c.format for c in result.layers)), "layers": layers,
        "mean_sqnr_db": sum(measured) / len(measured) if measured else None,
        "summary": result.summary(), "verify": _verify_dict(result),
    }


def _verify_dict(result) -> dict:
    if result is None:
        return {"ok": None, "summary": "verify off"}
    return {"ok": result.ok, "summary": result.summary(), "defects": result.defects[:20],
            "warnings": result.warnings[:20]}


def _finite(x):
    if x is None or math.isfinite(x):
        return x
    return 999.0 if x > 0 else -999.0
