"""sparseft: sparse fine-tuning of causal language models.

Train the few weight entries that matter for a task, save them as a small diff over the unchanged
base model, apply it on demand and revert it exactly.
"""

__version__ = "0.1.0"

from .quiet import quiet_library_noise  # noqa: E402

quiet_library_noise()  # before anything imports peft or torchao

from .config import SparseConfig  # noqa: E402
from .model import SparseModel, get_sparse_model  # noqa: E402
from .selection import select  # noqa: E402

__all__ = ["SparseConfig", "SparseModel", "get_sparse_model", "select", "__version__"]
