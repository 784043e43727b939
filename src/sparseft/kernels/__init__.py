"""Backward paths for the sparse values: which entries of dW = dYᵀX to compute, and how."""

from .reference import sampled_weight_grad

__all__ = ["sampled_weight_grad"]
