"""Choosing which weight entries to train: scorers rate entries, the budget decides how many per module."""

from .budget import allocate, budget_report, format_budget_report, module_budgets, top_k_indices
from .maskio import MaskFile, load_masks, read_mask_file, save_masks
from .scorers import SCORERS, get_scorer, register_scorer
from .selector import select

__all__ = [
    "SCORERS",
    "MaskFile",
    "allocate",
    "budget_report",
    "format_budget_report",
    "get_scorer",
    "load_masks",
    "module_budgets",
    "read_mask_file",
    "register_scorer",
    "save_masks",
    "select",
    "top_k_indices",
]
