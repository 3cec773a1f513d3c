"""sd3-adrpo: ADRPO (Adaptive Divergence Regularized Policy Optimization) for flow-matching text-to-image models.

The online loop (see ``sd3_adrpo.trainer``): sample -> score -> advantages -> update.
"""

__version__ = "0.1.0"
