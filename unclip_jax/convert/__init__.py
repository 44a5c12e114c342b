"""Converters from published checkpoints (OpenAI / open_clip / transformers CLIP,
Kakao Brain's Karlo in diffusers' layout) to ordinary unclip-jax workdirs."""
