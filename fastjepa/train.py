"""Entry point: ``python fastjepa/train.py --config configs/demo.json --output-dir DIR [key=value ...]``
or ``deepspeed [--num_accelerators N] fastjepa/train.py --config C ...``."""
import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not this folder's modules
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

# CPU: oneDNN builds and caches a primitive per new tensor shape (GELU among them); with packed
# variable-length batches every step brings new shapes and the cache grows by megabytes a step.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")

from fastjepa.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
