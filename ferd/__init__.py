"""ferd: Fairness-Enhanced Data-Free Robustness Distillation (FERD, arXiv 2509.20793) as a DVC pipeline.

The library layer: pure functions over tensors and frozen configuration dataclasses.
It never imports ``stages``, never reads argv and never prints; progress goes through callbacks.
"""

__version__ = "0.1.0"
