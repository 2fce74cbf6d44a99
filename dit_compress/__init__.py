"""dit_compress: compression and model surgery for Diffusion Transformers."""

__version__ = "0.1.0"
