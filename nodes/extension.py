"""The ComfyExtension that registers every node of the pack (ComfyUI's V3 entry point)."""
from comfy_api.latest import ComfyExtension

from .capture import CaptureCLIP, CaptureModel, SaveCalibration
from .graph import PlanFromCLIP, PlanFromModel
from .output import SaveQuantized, VerifyQuantized
from .quantize import QuantizeAuto, QuantizeFP8, QuantizeINT4, QuantizeINT8, QuantizeMXFP8, QuantizeNVFP4
from .source import LoadSafetensors, MergeLoRA
from .transform import SmoothQuant

NODES = [LoadSafetensors, PlanFromModel, PlanFromCLIP, MergeLoRA, SmoothQuant, QuantizeINT8, QuantizeINT4, QuantizeFP8,
         QuantizeNVFP4, QuantizeMXFP8, QuantizeAuto, SaveQuantized, VerifyQuantized, CaptureModel, CaptureCLIP,
         SaveCalibration]
NODES_BY_ID = {node.GET_SCHEMA().node_id: node for node in NODES}


class QuantCoreExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)
