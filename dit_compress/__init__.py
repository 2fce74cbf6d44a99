"""dit_compress: compression and model surgery for Diffusion Transformers."""

__version__ = "0.1.0"

_API = {
    "load_compressed": "dit_compress.core.manifest",
    "load_pipeline": "dit_compress.core.manifest",
    "load_teacher": "dit_compress.core.manifest",
    "save_compressed": "dit_compress.core.manifest",
    "load_transformer": "dit_compress.models.load",
    "load_recipe": "dit_compress.core.recipe",
    "run_recipe": "dit_compress.core.pipeline",
    "export_onnx": "dit_compress.export.onnx",
    "plug": "dit_compress.stages.prune.plug",
}


def __getattr__(name: str):
    # Lazy, so `import dit_compress` stays cheap and works without optional GPU packages.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dit_compress' has no attribute {name!r}")


__all__ = sorted(_API)
