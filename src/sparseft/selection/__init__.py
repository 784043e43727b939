"""Choosing which weight entries to train: scorers rate entries, the budget decides how many per module."""

from .budget import allocate, module_budgets, top_k_indices
from .scorers import SCORERS, get_scorer, register_scorer
from .select import select

__all__ = ["SCORERS", "allocate", "get_scorer", "module_budgets", "register_scorer", "select", "top_k_indices"]
