"""Adapters from diffusers model families to fastdit's layout -> method -> kernel line.

Each module here (one per model family) says where Q, K, V and RoPE are, where text sits in the
sequence, and how the latent grid and the denoising step are learned through diffusers hooks.
"""
