"""``python -m fastjepa.train --config demo --output-dir DIR [key=value ...]``, the same as ``fastjepa train``;
under DeepSpeed: ``deepspeed [--num_gpus N] --module fastjepa.train --config vith14 ...``."""
import sys

from fastjepa.cli import train_main

sys.exit(train_main())
