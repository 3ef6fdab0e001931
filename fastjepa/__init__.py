"""fastjepa: I-JEPA pretraining with packed variable-length token sets."""

__version__ = "0.1.0"
