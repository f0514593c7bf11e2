"""moon_fast: fast training of MOON2.0-style multimodal product-embedding models.

Public ops live in :mod:`moon_fast.ops`; the model in :mod:`moon_fast.model`; the CLI is ``moon-fast``.
"""

__version__ = "0.1.0"
