"""Self-supervised methods: each one small module with the contract of :class:`base.Method`."""
from .base import Method, build_method

__all__ = ["Method", "build_method"]
