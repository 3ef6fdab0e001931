"""The command line: ``fastjepa <command> ...`` (also ``python -m fastjepa <command> ...``).

Commands: ``train`` (pretraining; also ``python -m fastjepa.train`` and ``fastjepa-train``), ``probe``
(linear probe of a frozen encoder), ``knn`` (weighted kNN), ``convert`` (official I-JEPA checkpoints in,
timm weights out; also ``fastjepa-convert``).
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import presets

COMMANDS = {
    "train": "pretrain an encoder with I-JEPA",
    "probe": "linear-probe a frozen encoder on an image folder or the run's data",
    "knn": "weighted k-nearest-neighbour evaluation of a frozen encoder",
    "convert": "convert I-JEPA weights between the official, fastjepa and timm layouts",
}


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastjepa train", description="I-JEPA pretraining")
    parser.add_argument("--config", help="a JSON config file, or a packaged preset by name (" + ", ".join(presets()) + ")")
    parser.add_argument("--output-dir", default="runs/default", help="checkpoints, metrics.jsonl, config.json")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--overwrite", action="store_true", help="delete a run already in --output-dir and start again")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4 train.max_steps=100")
    return parser


def train_main(argv=None) -> int:
    # CPU: oneDNN builds and caches a primitive per new tensor shape (GELU among them); with packed
    # variable-length batches every step brings new shapes and the cache grows by megabytes a step.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    args = train_parser().parse_args(argv)
    from .config import ConfigError, load_config
    from .train import Trainer

    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, args.output_dir, resume=args.resume, local_rank=args.local_rank,
                          overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"fastjepa: error: {err}", file=sys.stderr)
        return 2
    return trainer.train()


def convert_main(argv=None) -> int:
    from .io.convert import main

    return main(argv)


def probe_main(argv=None) -> int:
    from .eval.linear_probe import main

    return main(argv)


def knn_main(argv=None) -> int:
    from .eval.knn import main

    return main(argv)


RUNNERS = {"train": train_main, "probe": probe_main, "knn": knn_main, "convert": convert_main}


def usage() -> str:
    lines = ["usage: fastjepa <command> [arguments]  (fastjepa <command> --help for its arguments)", "", "commands:"]
    lines += [f"  {name:10} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"fastjepa {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in RUNNERS:
        print(f"fastjepa: unknown command '{command}'\n{usage()}", file=sys.stderr)
        return 2
    return RUNNERS[command](rest)
