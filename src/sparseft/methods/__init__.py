"""Training methods, each one registered object (in the spirit of PEFT's ``register_peft_method``).

``get_method(name)`` answers everything that differs between methods: config checks, preparing the
model, saving and attaching the artifact, benchmark rows. A new method is one new file here plus
one ``register_method`` line below.

Example:
    >>> from sparseft.methods import get_method
    >>> get_method("lora").artifact_kind
    'adapter'
"""

from .base import BaseMethod
from .full import FullMethod
from .lora import LoraMethod
from .registry import METHODS, Method, detect_artifact, get_method, register_method, training_methods
from .sparse import SparseMethod

register_method(SparseMethod())
register_method(FullMethod())
register_method(LoraMethod())
register_method(BaseMethod())

__all__ = ["METHODS", "Method", "detect_artifact", "get_method", "register_method", "training_methods"]
