"""Audit and safety checks of a diff: verify it, look inside it, measure how it moves behaviour.

- ``verify_diff``: every integrity/compatibility check, each reported (``sparseft verify``).
- ``inspect_diff``: where the entries sit and how large they are (``sparseft inspect``).
- ``audit_diff``: base vs fine-tuned on probe prompts: KL, top-1 agreement, pair drift (``sparseft audit``).
"""

from .heatmap import plot_heatmap
from .inspection import format_inspection, inspect_diff
from .verify import CheckResult, format_verification, verify_diff

__all__ = ["CheckResult", "format_inspection", "format_verification", "inspect_diff", "plot_heatmap", "verify_diff"]
