"""sfvideo: Self Forcing (Huang et al., 2025, arXiv 2506.08009) for real-time autoregressive video diffusion.

Importing the package is cheap: submodules are imported where they are used.
"""

__version__ = "0.1.0"
