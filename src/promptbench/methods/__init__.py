"""Methods: one file each, all behind the `Method` interface of `base.py`."""

from promptbench.methods.base import Method

__all__ = ["Method"]
