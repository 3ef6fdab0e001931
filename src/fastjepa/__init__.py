"""fastjepa: I-JEPA pretraining with packed variable-length token sets."""

__version__ = "0.1.0"
__all__ = ["load_encoder"]


def __getattr__(name: str):
    # lazy: `import fastjepa` stays light (no torch) until the encoder loader is asked for
    if name == "load_encoder":
        from .io.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'fastjepa' has no attribute {name!r}")
