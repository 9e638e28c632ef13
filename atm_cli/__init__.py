"""atm: training-free Adaptive Token Merging for timm Vision Transformers."""
