"""Files on disk: the one atomic writer, the one weights-only reader, and checkpoint names.

Every file fastjepa writes goes through :func:`atomic_write`: a temporary file in the same folder, fsynced,
renamed over the final name, then the folder fsynced, so a kill at any moment leaves either the old file
or the new one and a half-written file never carries a real name; a write that fails (disk full, read-only)
is a :class:`SaveError` naming the file and the free space. Every weights file it reads goes through
:func:`read_weights`: safetensors, or ``torch.load(weights_only=True)`` (tensors and plain containers only:
nothing else is unpickled). Any problem is a :class:`CheckpointError` naming the file and the reason in
our own words (torch's advice to load with ``weights_only=False`` is never passed on).
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^step_(\d{8})(\.pt)?$")  # a file step_XXXXXXXX.pt, or a DeepSpeed tag folder
TMP_SUFFIX = ".tmp"  # atomic_write's temporary files: f".{name}.{random}.tmp" beside the final name
TMP_RE = re.compile(r"^\..+\.tmp$")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
TARGET_FILE = "target_encoder.safetensors"  # a run's exported target encoder, beside checkpoints/


class CheckpointError(ValueError):
    """A weights or checkpoint file that is missing, unreadable, or does not fit the model; the message
    names the file and, for a misfit, the keys."""


class SaveError(OSError):
    """A file that could not be written (disk full, read-only, ...); the message names the file, the
    reason in plain words and the space left on its file system. The previous file, if any, is intact."""


def checkpoint_tag(step: int) -> str:
    """``step_XXXXXXXX``: the name of a checkpoint (``.pt`` file, or DeepSpeed tag folder)."""
    return f"step_{step:08d}"


def checkpoint_file(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"{checkpoint_tag(step)}.pt"


def step_of(path: str | Path) -> int | None:
    """The step a checkpoint's name carries, or None for any other name (temporary files included)."""
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The ``step_XXXXXXXX.pt`` files of a folder, oldest first (temporary files are not among them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".pt" and step_of(p) is not None)


def newest_checkpoint_file(folder: str | Path) -> Path | None:
    found = checkpoint_files(folder)
    return found[-1] if found else None


def prune_checkpoint_files(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint files of a folder. The newest one (the checkpoint
    just written) is never deleted, whatever ``keep`` says (``keep < 1`` counts as 1)."""
    for old in checkpoint_files(folder)[:-max(1, int(keep))]:
        old.unlink(missing_ok=True)


def temporary_files(folder: str | Path) -> list[Path]:
    """The temporary files :func:`atomic_write` leaves behind when a save is killed (``.NAME.*.tmp``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if TMP_RE.match(p.name) and p.is_file())


def free_space(folder: str | Path) -> str:
    """``"1.2 GB free"``: the space left on the file system holding ``folder`` (its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{human_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        return "free space unknown"


def human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def save_error(path: str | Path, err: BaseException) -> SaveError:
    """A :class:`SaveError` for a failed write of ``path``: the OS error behind ``err`` in plain words.

    torch's writer hides the OS error (``RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos``) but keeps it as the exception's context when it writes through a Python file object, as
    :func:`torch_save` does; safetensors puts it in its message."""
    path, cause, seen = Path(path), None, err
    while seen is not None and cause is None:
        if isinstance(seen, OSError) and seen.errno is not None:
            cause = seen
        seen = seen.__cause__ or seen.__context__
    code = cause.errno if cause is not None else None
    text = str(err)
    if code is None and ("No space left" in text or "StorageFull" in text):
        code = errno.ENOSPC
    if code is None and ("Read-only file system" in text or "ReadOnlyFilesystem" in text):
        code = errno.EROFS
    reason = os.strerror(code).lower() if code is not None else f"the write failed ({_first_line(err)})"
    out = SaveError(f"could not write '{path}': {reason} ({free_space(path.parent)} on that file system)")
    out.errno = code
    return out


def _is_write_failure(err: BaseException) -> bool:
    """An error of the writer (the OS, torch's zip writer, safetensors), not a bug in the caller."""
    if isinstance(err, SaveError):
        return False
    return isinstance(err, (OSError, RuntimeError)) or "Safetensor" in type(err).__name__


def _innermost(err: BaseException) -> BaseException:
    """The first exception of ``err``'s chain: what a Python callback raised inside torch's C++ writer."""
    while err.__context__ is not None:
        err = err.__context__
    return err


def move_aside(path: str | Path, folder: str | Path) -> Path:
    """Move a file or folder into ``folder`` (created), keeping its name unless one is taken there."""
    path, folder = Path(path), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dest, n = folder / path.name, 1
    while dest.exists():
        dest, n = folder / f"{path.name}.{n}", n + 1
    os.replace(path, dest)
    return dest


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Create ``path`` through ``write(temporary_path)``: all of it or, after a crash, none of it. A write
    that fails is a :class:`SaveError` (the temporary file removed, an older ``path`` untouched)."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # what open() would give (mkstemp's 0600 hides runs from the team)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a crash
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = _innermost(err)
        if isinstance(cause, KeyboardInterrupt):  # a second Ctrl-C inside torch's writer: torch re-raises it
            raise cause from None  # as "unexpected pos"; it is an interrupt, not a failed write
        if _is_write_failure(err) and (cause is err or isinstance(cause, OSError)):
            raise save_error(path, err) from err
        raise
    return path


def export_safetensors(path: str | Path, state_dict: dict, metadata: dict | None = None) -> Path:
    """Atomically write a state dict (contiguous CPU copies) as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def torch_save(path: str | Path, obj) -> Path:
    """Atomically ``torch.save`` an object of tensors and plain containers."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a Python file object: torch then keeps the OSError (e.g. disk full)
            torch.save(obj, f)

    return atomic_write(path, write)


def verify_checkpoint_file(path: str | Path) -> None:
    """Check that a ``torch.save`` archive is whole: a zip whose every member passes its CRC (torch.load
    itself checks no CRC, so a flipped byte in a tensor would load silently); a safetensors file: its header
    parses and fits the file's size. Raises
    :class:`CheckpointError` with the reason in one line: missing, a folder, empty, truncated, not a
    torch archive, damaged."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes): a save that never wrote")
    if path.suffix == ".safetensors":  # no CRC there: the header must parse and match the file's size
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"'{path}' is not a whole safetensors file: {_first_line(err)}") from None
        return
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        if magic == b"PK\x03\x04":  # a zip's start without its end: cut off
            raise CheckpointError(f"'{path}' is truncated ({human_bytes(size)}: the archive's end is "
                                  "missing)") from None
        raise CheckpointError(f"'{path}' is not a torch.save archive ({human_bytes(size)} of something "
                              f"else: {_first_line(err)})") from None
    if bad is not None:
        raise CheckpointError(f"'{path}' is damaged: its part '{bad}' fails its CRC check")


def read_weights(path: str | Path, map_location="cpu") -> tuple[dict, dict]:
    """``(contents, metadata)``: a safetensors file's tensors and string metadata, or the dict a
    ``torch.save`` file holds (metadata empty). Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a directory, not a weights file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {_first_line(err)}") from None
    if path.stat().st_size == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes)")
    import torch

    try:
        contents = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page long; its "Unsupported global: GLOBAL x.Y" sentence names the culprit
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not found:  # torch's text here advises weights_only=False: never pass that on
            raise CheckpointError(f"'{path}' is not a torch.save file of tensors (random bytes, a plain "
                                  "pickle, or a damaged file)") from None
        raise CheckpointError(
            f"'{path}' holds Python objects besides tensors and plain containers, which "
            f"torch.load(weights_only=True) will not unpickle (it refuses {found.group(1)}); re-save its state "
            "dicts alone (a dict of tensors) to load it") from None
    except Exception as err:  # noqa: BLE001 - a truncated zip, a foreign file: name the file
        raise CheckpointError(f"'{path}' cannot be read as a PyTorch checkpoint (truncated, or not a torch.save "
                              f"file): {_first_line(err)}") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"'{path}' holds a {type(contents).__name__}, not a dict of state dicts")
    return contents, {}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return type(err).__name__ if "weights_only" in line else line  # never relay torch's unpickling advice


__all__ = ["CHECKPOINT_RE", "TARGET_FILE", "CheckpointError", "SaveError", "atomic_write", "checkpoint_file",
           "checkpoint_files", "checkpoint_tag", "export_safetensors", "free_space", "human_bytes", "move_aside",
           "newest_checkpoint_file", "prune_checkpoint_files", "read_weights", "save_error", "step_of",
           "temporary_files", "torch_save", "verify_checkpoint_file"]
