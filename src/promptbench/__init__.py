"""promptbench: few-shot adaptation of CLIP-like models behind one interface."""

__version__ = "0.1.0"
