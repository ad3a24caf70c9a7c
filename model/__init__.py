"""Qwen3.5-MoE decode step in Triton kernels, exact against Hugging Face transformers."""
