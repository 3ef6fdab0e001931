"""The command line: ``fastjepa <command> ...`` (also ``python -m fastjepa <command> ...``).

Commands: ``train`` (pretraining; also ``python -m fastjepa.train`` and ``fastjepa-train``), ``probe``
(linear probe of a frozen encoder), ``knn`` (weighted kNN), ``convert`` (official I-JEPA checkpoints in,
timm weights out; also ``fastjepa-convert``), ``export`` (one encoder out of a run or a ZeRO-3 tag),
``plot`` and ``bench-report``. Each command's module is imported when the command runs, so ``--help``
and configuration errors come back without importing torch.

Every command runs under :func:`run_command`: a user error (a bad config value, a missing or unreadable
file, a path that is a file, a read-only or full disk) is one line ``fastjepa: error: ...`` naming the key
or the path, exit code 2; anything else is a bug and keeps its traceback. ``FASTJEPA_DEBUG=1`` shows the
traceback of user errors too.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from pathlib import Path

from .config import SECTIONS, ConfigError, help_text, markdown_table, presets

EXIT_USAGE = 2  # argparse's code for a bad command line; ours for every user error


# ---------------------------------------------------------------------------------------------------
# user errors: one line, exit code 2
# ---------------------------------------------------------------------------------------------------
class StartupError(Exception):
    """A check at start-up that failed on the user's input (data, masks, devices); the message says which."""


# errno -> the line for a path with that problem, for OSErrors a user can fix; any other errno is a bug
PATH_PROBLEMS = {
    errno.ENOENT: "'{path}' does not exist",
    errno.EACCES: "permission denied: '{path}'",
    errno.EPERM: "operation not permitted: '{path}'",
    errno.EROFS: "'{path}' is on a read-only file system",
    errno.ENOSPC: "no space left on the device writing '{path}'",
    errno.EDQUOT: "disk quota exceeded writing '{path}'",
    errno.ENOTDIR: "'{path}' is not a folder",
    errno.EEXIST: "'{path}' already exists",
    errno.EISDIR: "'{path}' is a folder, not a file",
}


def describe_os_error(err: OSError) -> str | None:
    """One line naming the path and its problem, or None for an OSError that is not the user's to fix."""
    if err.errno not in PATH_PROBLEMS:
        return str(err) if isinstance(err, (FileNotFoundError, PermissionError)) else None
    if err.filename is None:  # raised by our own code with a message, or a write() that hit a full disk
        return err.strerror if str(err).startswith("[Errno") and err.strerror else str(err)
    path = Path(os.fsdecode(err.filename))
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None and blocker != path and err.errno == errno.ENOTDIR:
            return f"'{path}': '{blocker}' is a file, not a folder"
        if blocker == path:
            return f"'{path}' is a file, not a folder"
    return PATH_PROBLEMS[err.errno].format(path=path)


FIRST_PARTY = ("fastjepa", "fastjepa_kernels")  # a module of ours that is missing is a bug, not the user's


def user_error_line(err: BaseException) -> str | None:
    """The one line a user error is shown as, or None when ``err`` is a bug (it keeps its traceback)."""
    checkpoint_error = getattr(sys.modules.get("fastjepa.io.files"), "CheckpointError", None)
    if isinstance(err, (ConfigError, StartupError)) or (checkpoint_error and isinstance(err, checkpoint_error)):
        return str(err)
    if isinstance(err, ModuleNotFoundError) and err.name and err.name.split(".")[0] not in FIRST_PARTY:
        return f"this needs the Python package '{err.name.split('.')[0]}', which is not installed"  # an optional one
    if isinstance(err, OSError):
        return describe_os_error(err)
    return None


def run_command(command, argv) -> int:
    """``command(argv)`` -> its exit code; a user error -> one line on stderr and exit code 2."""
    try:
        return command(argv)
    except BrokenPipeError:  # stdout closed early (`fastjepa train --help | head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush stays quiet
        return 1
    except Exception as err:
        line = user_error_line(err)
        if line is None or os.environ.get("FASTJEPA_DEBUG") == "1":
            raise
        print(f"fastjepa: error: {line}", file=sys.stderr, flush=True)
        return EXIT_USAGE


# ---------------------------------------------------------------------------------------------------
# fastjepa train
# ---------------------------------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    """The train command's arguments; ``--help`` lists every config key, section by section."""
    parser = argparse.ArgumentParser(
        prog="fastjepa train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="I-JEPA pretraining. Config keys are set as section.key=VALUE anywhere on the command line\n"
                    "(VALUE parsed as JSON when it parses: 5e-4, true, null, [0.99,1.0]; a bare string otherwise).",
        epilog="examples:\n  fastjepa train --config demo --output-dir runs/demo\n"
               "  fastjepa train --config vith14 --output-dir runs/h14 data.root=/data/imagenet/train\n"
               "  deepspeed --num_gpus 8 --module fastjepa.train --config vith14 --output-dir runs/h14 "
               "train.grad_accum_steps=2 data.root=...")
    parser.add_argument("--config", help="a JSON config file, or a packaged preset by name (" + ", ".join(presets()) + ")")
    parser.add_argument("--output-dir", default="runs/default", help="checkpoints, metrics.jsonl, config.json")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--help-config-markdown", action="store_true", help=argparse.SUPPRESS)  # the README table
    parser.add_argument("--overwrite", action="store_true", help="delete a run already in --output-dir and start again")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=VALUE", help="config overrides, e.g. optim.lr=5e-4")
    for section in SECTIONS:
        parser.add_argument_group(f"config keys: {section}", help_text(section))
    return parser


def _train(argv) -> int:
    # CPU: oneDNN builds and caches a primitive per new tensor shape (GELU among them); with packed
    # variable-length batches every step brings new shapes and the cache grows by megabytes a step.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    args = train_parser().parse_intermixed_args(argv)  # key=value before or after any option
    if args.help_config_markdown:
        print(markdown_table())
        return 0
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # every key and value checked before anything is built
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    output_dir = Path(args.output_dir)  # a file there, a path under a file, a read-only disk: train.run_dir
    from .train import Trainer

    try:
        trainer = Trainer(cfg, output_dir, resume=args.resume, local_rank=args.local_rank,
                          overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        # the data and mask checks at start-up raise these with a message naming the key or folder
        if isinstance(err, OSError) and err.errno in PATH_PROBLEMS:
            raise
        raise StartupError(str(err)) from err
    return trainer.train()


# ---------------------------------------------------------------------------------------------------
# the other commands: imported when run
# ---------------------------------------------------------------------------------------------------
def _module_main(module: str, command: str):
    """``module.main(argv)``, imported when the command runs; a module not installed (yet) is one clear line."""
    def run(argv) -> int:
        try:
            main = importlib.import_module(module).main
        except ModuleNotFoundError as err:
            if err.name and (module == err.name or module.startswith(err.name + ".")):
                raise StartupError(f"'fastjepa {command}' is not available in this installation "
                                   f"(no module {module})") from err
            raise
        return main(argv)

    return run


COMMANDS = {  # name: (one line for the usage, runner)
    "train": ("pretrain an encoder with I-JEPA", _train),
    "probe": ("linear-probe a frozen encoder on an image folder or the run's data",
              _module_main("fastjepa.eval.linear_probe", "probe")),
    "knn": ("weighted k-nearest-neighbour evaluation of a frozen encoder", _module_main("fastjepa.eval.knn", "knn")),
    "convert": ("convert I-JEPA weights between the official, fastjepa and timm layouts",
                _module_main("fastjepa.io.convert", "convert")),
    "export": ("write the encoder of a run or a ZeRO-3 tag as .safetensors (or timm weights)",
               _module_main("fastjepa.export", "export")),
    "plot": ("plot a run's metrics.jsonl", _module_main("fastjepa.plot", "plot")),
    "bench-report": ("summarise benchmark results", _module_main("fastjepa.bench_report", "bench-report")),
}


def train_main(argv=None) -> int:
    return run_command(_train, sys.argv[1:] if argv is None else argv)


def probe_main(argv=None) -> int:
    return run_command(COMMANDS["probe"][1], sys.argv[1:] if argv is None else argv)


def knn_main(argv=None) -> int:
    return run_command(COMMANDS["knn"][1], sys.argv[1:] if argv is None else argv)


def convert_main(argv=None) -> int:
    return run_command(COMMANDS["convert"][1], sys.argv[1:] if argv is None else argv)


def usage() -> str:
    lines = ["usage: fastjepa <command> [arguments]  (fastjepa <command> --help for its arguments)", "", "commands:"]
    lines += [f"  {name:13} {text}" for name, (text, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"fastjepa {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastjepa: error: unknown command '{command}'\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    return run_command(COMMANDS[command][1], rest)
