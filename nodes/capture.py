"""Capture Calibration (Model / CLIP) and Save Calibration: real input statistics from the user's own workflow.

Capture Calibration (Model) returns a clone of the MODEL carrying two wrappers (ComfyUI's patcher mechanism): while a
sampler samples with that clone, forward hooks on the diffusion model's Linear layers feed the engine's capture
session; the hooks exist only inside that sampling call, so the same model object used elsewhere (another sampler,
another workflow) is never recorded. Capture Calibration (CLIP) does the same for a text encoder: the returned CLIP is
a clone whose encoder records only while it encodes. Save Calibration, run after the sampler (or text encode), merges
the run into a calibration file in models/quant_calibration (quant_core.capture.save_capture).
"""
from __future__ import annotations

import os

from comfy_api.latest import io

from .. import quant_core
from ..quant_core import QuantError
from . import paths
from .types import CATEGORY, QuantCalibration as CalibrationLink, QuantCapture as CaptureLink

WRAPPER_KEY = "quant_core_capture"


def current_run() -> object:
    """The id of the prompt being executed (runs of a queue are told apart by it), or None."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return getattr(context, "prompt_id", None)


def _budget_inputs() -> list:
    return [
        io.Float.Input("budget_gb", default=quant_core.capture.DEFAULT_BUDGET_GB, min=0.0, max=4096.0, step=0.25,
                       tooltip="Memory for the statistics on the device the model runs on (GPU, or host memory on the "
                               "CPU). Every layer gets its diagonal statistics; full Hessians (4·K² bytes each) go to "
                               "the narrowest layers first until the budget is spent. ComfyUI sees it as used and "
                               "offloads weights instead of running out of memory. Flux-dev needs about 68 GB for "
                               "full Hessians everywhere; 4 GB covers the 3072-wide layers in part."),
        io.Int.Input("max_tokens", default=quant_core.capture.DEFAULT_MAX_TOKENS, min=0, max=1 << 24,
                     tooltip="Rows of each model call that enter the Hessian (evenly strided; 0 = all). The other "
                             "statistics use every row. Bounds the cost of capture at large resolutions."),
    ]


class CaptureHandle:
    """What flows on a QUANT_CAPTURE link: the engine's session."""

    def __init__(self, session: object):
        self.session = session


class CaptureModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCoreCaptureModel", display_name="Capture Calibration (Model)", category=CATEGORY,
            description="Records the inputs of every Linear layer of the diffusion model while a sampler runs the "
                        "returned MODEL (any sampler, any number of steps and prompts). Connect the capture output to "
                        "Save Calibration. Sampling results are unchanged.",
            inputs=[io.Model.Input("model", tooltip="Any diffusion model ComfyUI loads (LoRAs and patches applied "
                                                    "upstream are part of what is recorded).")] + _budget_inputs(),
            outputs=[io.Model.Output(display_name="model", tooltip="The same model, recording while it samples."),
                     CaptureLink.Output(display_name="capture", tooltip="Connect to Save Calibration.")],
        )

    @classmethod
    def execute(cls, model, budget_gb, max_tokens) -> io.NodeOutput:
        import comfy.patcher_extension as ext
        diffusion = model.get_model_object("diffusion_model")
        name = f"{type(model.model).__name__} diffusion model"
        try:
            session = quant_core.capture.new_session(name, "diffusion model", quant_core.capture.linear_widths(diffusion), budget_gb,
                                          max_tokens)
        except QuantError as e:
            raise ValueError(str(e)) from None
        patched = model.clone()
        patched.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample(session))
        patched.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model(session))
        return io.NodeOutput(patched, CaptureHandle(session),
                             ui={"text": [f"capture: {session.plan.describe()}"]})


def _outer_sample(session: object):
    """Around one sampling call: enter the run, allocate the statistics before the model is loaded, hook the layers."""
    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        patcher = guider.model_patcher
        session.start(current_run())
        session.allocate(patcher.load_device)
        with session.hooks(patcher.get_model_object("diffusion_model")):
            return executor(*args, **kwargs)
    return wrapper


def _apply_model(session: object):
    """Each model call: its noise levels, for the timestep coverage."""
    def wrapper(executor, x, t, *args, **kwargs):
        session.note_call(t)
        return executor(x, t, *args, **kwargs)
    return wrapper


class CaptureCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCoreCaptureCLIP", display_name="Capture Calibration (CLIP)", category=CATEGORY,
            description="Records the inputs of every Linear layer of the text encoder(s) while the returned CLIP "
                        "encodes prompts. Connect the capture output to Save Calibration, with the CONDITIONING as "
                        "its 'after' input. Conditioning is unchanged.",
            inputs=[io.Clip.Input("clip", tooltip="Any text encoder ComfyUI loads (T5-XXL, CLIP-L, Mistral, …).")]
            + _budget_inputs(),
            outputs=[io.Clip.Output(display_name="clip", tooltip="The same CLIP, recording while it encodes."),
                     CaptureLink.Output(display_name="capture", tooltip="Connect to Save Calibration.")],
        )

    @classmethod
    def execute(cls, clip, budget_gb, max_tokens) -> io.NodeOutput:
        encoder = clip.cond_stage_model
        names = "+".join(n for n, m in encoder.named_children() if any(True for _ in m.parameters())) or \
            type(encoder).__name__
        try:
            session = quant_core.capture.new_session(f"{names} text encoder", "text encoder", quant_core.capture.linear_widths(encoder),
                                          budget_gb, max_tokens)
        except QuantError as e:
            raise ValueError(str(e)) from None
        patched = clip.clone()
        patched.cond_stage_model = RecordingEncoder(encoder, session, patched.patcher)
        patched.tokenizer = RecordingTokenizer(clip.tokenizer, session)
        return io.NodeOutput(patched, CaptureHandle(session), ui={"text": [f"capture: {session.plan.describe()}"]})


class _Proxy:
    """Delegates everything to the wrapped object (attribute writes too), except what a subclass defines."""

    def __init__(self, inner, session):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_session", session)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


class RecordingEncoder(_Proxy):
    """The text encoder of a captured CLIP: records while encoding, otherwise the encoder itself."""

    def __init__(self, inner, session, patcher):
        super().__init__(inner, session)
        object.__setattr__(self, "_patcher", patcher)

    def encode_token_weights(self, tokens):
        session = self._session
        session.start(current_run())
        session.allocate(self._patcher.load_device)
        session.note_call()
        with session.hooks(self._inner):
            return self._inner.encode_token_weights(tokens)


class RecordingTokenizer(_Proxy):
    """The tokenizer of a captured CLIP: notes each prompt text for the file's header."""

    def tokenize_with_weights(self, text, *args, **kwargs):
        self._session.start(current_run())
        self._session.note_prompt(text)
        return self._inner.tokenize_with_weights(text, *args, **kwargs)


class SaveCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCoreSaveCalibration", display_name="Save Calibration", category=CATEGORY, is_output_node=True,
            description="Writes what a Capture node recorded in this run into models/quant_calibration/<filename>."
                        "safetensors — adding it to the file when it exists (mode accumulate), so queuing 20 runs "
                        "calibrates on 20 prompts. Every n-th run goes to held-out statistics, which the quality "
                        "report and the methods' fall-back to round-to-nearest use. Atomic: a cancelled run leaves the "
                        "file as it was.",
            inputs=[
                CaptureLink.Input("capture", tooltip="From Capture Calibration (Model) or (CLIP)."),
                io.AnyType.Input("after", tooltip="The sampler's LATENT (or the text encode's CONDITIONING): makes this "
                                                  "node run after the captured model has run."),
                io.String.Input("filename", default="calibration",
                                tooltip="File name in models/quant_calibration (.safetensors is added)."),
                io.Combo.Input("mode", options=list(quant_core.capture.MODES), default="accumulate",
                               tooltip="accumulate: add this run to the file if it exists (it must be a capture of the "
                                       "same model); new file: refuse a name that exists."),
                io.Combo.Input("role", options=list(quant_core.capture.ROLES), default="auto",
                               tooltip="auto: every heldout_every-th run of the file is held out; fit / held-out: this "
                                       "run's role, whatever its number."),
                io.Int.Input("heldout_every", default=quant_core.capture.DEFAULT_HELDOUT_EVERY, min=0, max=1000,
                             tooltip="With role auto: runs 4, 8, 12 … (for 4) go to held-out statistics; 0 = none. "
                                     "The first run always fits."),
                io.Int.Input("ready_after_runs", default=1, min=1, max=100000,
                             tooltip="The calibration output passes on (to Quantize nodes) on the fitting run that "
                                     "brings the file to this many fitting runs (and to 2×, 3×, …); on other runs the "
                                     "nodes after it do not run. 1 = every run."),
            ],
            outputs=[CalibrationLink.Output(display_name="calibration",
                                            tooltip="The saved file, for a Quantize or SmoothQuant node's "
                                                    "calibration_file input.")],
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, filename=None, mode="accumulate", role="auto", heldout_every=0, **_):
        try:  # a linked (not yet known) value is checked in execute
            if isinstance(filename, str):
                _target(filename, create=False)
            _check_choices(mode, role, heldout_every if isinstance(heldout_every, int) else 0)
        except (QuantError, ValueError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, capture, after, filename, mode, role, heldout_every, ready_after_runs) -> io.NodeOutput:
        from comfy_execution.graph_utils import ExecutionBlocker
        if not isinstance(capture, CaptureHandle):
            raise ValueError("capture: connect the capture output of a Capture Calibration node")
        try:
            _check_choices(mode, role, heldout_every)
            path = _target(filename)
            run = capture.session.take(current_run())
            if run is not None and run.kind == "diffusion model":
                for text in _prompt_texts(getattr(cls.hidden, "prompt", None)):
                    run.prompts.append(text)
            summary = quant_core.capture.save_capture(path, run, mode, role, heldout_every)
        except QuantError as e:
            raise ValueError(str(e)) from None
        line = summary.describe()
        ui = {"text": [line]}
        if not _passes_on(summary, ready_after_runs):
            left = ready_after_runs - summary.runs % ready_after_runs
            ui["text"].append(f"{left} more fitting runs before the calibration passes on")
            return io.NodeOutput(ExecutionBlocker(None), ui=ui)
        return io.NodeOutput(path, ui=ui)


def _passes_on(summary, every: int) -> bool:
    """Whether the nodes after Save Calibration run this time: every run for 1; otherwise on the fitting run that
    brings the file to N, 2N, … fitting runs (a queue of 20 runs with N = 20 quantizes once, at the end)."""
    return every <= 1 or (summary.role == "fit" and summary.runs % every == 0)


def _check_choices(mode, role, heldout_every) -> None:
    if mode not in quant_core.capture.MODES or role not in quant_core.capture.ROLES:
        raise QuantError(f"mode must be one of {', '.join(quant_core.capture.MODES)}; role one of {', '.join(quant_core.capture.ROLES)}")
    if heldout_every < 0 or heldout_every == 1:
        raise QuantError("heldout_every must be 0 (none) or at least 2 (1 would hold out every run)")


def _target(filename: str, create: bool = True) -> str:
    """models/quant_calibration/<filename>.safetensors, confined to that folder."""
    import folder_paths
    name = (filename or "").strip()
    if name.lower().endswith(paths.SUFFIX):
        name = name[: -len(paths.SUFFIX)]
    if not name or name in (".", "..") or any(c in name for c in '/\\:\0') or name.startswith("."):
        raise QuantError(f"filename {filename!r}: a plain file name (no folders, not starting with a dot)")
    base = os.path.abspath(folder_paths.get_folder_paths("quant_calibration")[0])
    if create:
        os.makedirs(base, exist_ok=True)
    path = os.path.join(base, name + paths.SUFFIX)
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
        raise QuantError(f"filename {filename!r}: exists and is not a regular file")
    return path


def _prompt_texts(prompt) -> list[str]:
    """The prompt texts of the text-encode nodes in the executed workflow (recorded in the file's header)."""
    texts = []
    for node in (prompt or {}).values():
        if not isinstance(node, dict) or "TextEncode" not in str(node.get("class_type", "")):
            continue
        for key, value in (node.get("inputs") or {}).items():
            if isinstance(value, str) and key in ("text", "prompt", "clip_l", "t5xxl"):
                texts.append(value)
    return texts
