"""``deepspeed fastjepa/train.py --config configs/vith14.json ...`` from a checkout: the trainer's entry point.

This folder is not the package (that is ``src/fastjepa``, installed by ``pip install -e .``); it only lets
launchers that take a script path start the installed trainer. ``python -m fastjepa.train``,
``deepspeed --module fastjepa.train`` and ``fastjepa train`` are the same command.
"""
import sys

from fastjepa.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
