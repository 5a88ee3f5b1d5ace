"""LoRA merging before quantization: key styles (`mapping`), deltas and streaming application (`merge`)."""
