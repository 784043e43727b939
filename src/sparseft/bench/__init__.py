"""Benchmarks. ``gpu_step``: the cost of one fine-tuning step, full FT vs LoRA vs sparse (old/new path)."""
