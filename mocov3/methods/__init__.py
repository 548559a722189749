"""Self-supervised methods: each one small module with the contract of :class:`base.Method`."""
from .base import Method, MomentumMethod
from .factory import METHODS, build_method, method_class

__all__ = ["Method", "MomentumMethod", "METHODS", "build_method", "method_class"]
