"""ranprm: weakly supervised instance segmentation with Residual Attention Networks and Peak Response Maps."""

__version__ = "0.1.0"
