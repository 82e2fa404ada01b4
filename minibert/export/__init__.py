"""The export room: a transformers-loadable folder (hf) with its standalone model code
(modeling_minibert, which imports nothing from minibert)."""
