"""Which layers are quantized, and into which format: presets (`presets`), default keeps (`rules`), per-layer
rules (`layer_config`) and the plan that combines them with shape fit (`plan`)."""
