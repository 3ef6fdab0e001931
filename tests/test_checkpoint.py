"""Checkpoints are atomic: a process killed mid-save leaves the previous checkpoint as the latest, whole
and loadable with ``weights_only``; no partial file ever carries a checkpoint's name."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fastjepa.cli import train_main as main
from fastjepa.io.files import (
    CHECKPOINT_RE,
    CheckpointError,
    checkpoint_file,
    checkpoint_files,
    export_safetensors,
    newest_checkpoint_file,
    prune_checkpoint_files,
    read_weights,
    torch_save,
)


def save_checkpoint(folder, step, state, keep=2):
    """What the single-process checkpoint store does: an atomic save, then the newest ``keep`` kept."""
    path = torch_save(checkpoint_file(folder, step), state)
    prune_checkpoint_files(folder, keep)
    return path


def load_checkpoint(path) -> dict:
    return read_weights(path)[0]


latest_checkpoint, list_checkpoints, checkpoint_path = newest_checkpoint_file, checkpoint_files, checkpoint_file

# The child saves checkpoint 1 normally, then makes the writer slow (half the bytes, then a long sleep)
# and starts checkpoint 2 (or a new safetensors export); the parent kills it with SIGKILL mid-write.
CHILD = textwrap.dedent("""
    import contextlib, io, sys, time
    import torch
    import safetensors.torch
    from fastjepa.io import files

    folder, what = sys.argv[1], sys.argv[2]
    def state(v):
        return {"step": v, "model": {"w": torch.full((256, 256), float(v)), "b": torch.arange(7) * v},
                "rng": torch.get_rng_state()}

    files.torch_save(files.checkpoint_file(folder, 1), state(1))
    files.export_safetensors(folder + "/target.safetensors", {"w": torch.full((256, 256), 1.0)})

    def half_then_hang(data: bytes, path):  # path: a file name, or the open file torch_save writes through
        with (open(path, "wb") if isinstance(path, str) else contextlib.nullcontext(path)) as f:
            f.write(data[: len(data) // 2])
            f.flush()
        print("HALF", flush=True)
        time.sleep(120)

    def slow_torch_save(obj, path, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        half_then_hang(buf.getvalue(), path)

    def slow_save_file(tensors, path, metadata=None):
        half_then_hang(safetensors.torch.save(tensors, metadata=metadata), path)

    real_save = torch.save
    if what == "pt":
        torch.save = slow_torch_save
        files.torch_save(files.checkpoint_file(folder, 2), state(2))
    else:
        safetensors.torch.save_file = slow_save_file
        files.export_safetensors(folder + "/target.safetensors", {"w": torch.full((256, 256), 2.0)})
    print("UNREACHED", flush=True)
""")


@pytest.mark.subprocess
@pytest.mark.parametrize("what", ["pt", "safetensors"])
def test_kill_mid_save_keeps_previous(tmp_path, helpers, what):
    folder = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), what], env=helpers.subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HALF", (line, proc.stderr.read() if proc.poll() is not None else "")
        partial = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert partial and all(p.stat().st_size > 0 for p in partial)  # the write really was under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert latest_checkpoint(folder) == checkpoint_path(folder, 1)
    named = [p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name)]
    assert named == [checkpoint_path(folder, 1)]  # the half-written file carries no checkpoint name
    state = torch.load(named[0], weights_only=True)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(256, 256))
    assert load_checkpoint(named[0])["step"] == 1
    target = load_file(folder / "target.safetensors")  # the previous export, whole
    assert torch.equal(target["w"], torch.ones(256, 256))


def test_keep_prunes_oldest_and_ignores_temporaries(tmp_path):
    (tmp_path / ".step_00000009.pt.abc.tmp").write_bytes(b"partial")
    (tmp_path / "step_9.pt").write_bytes(b"not our name")
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    assert latest_checkpoint(tmp_path).name == "step_00000004.pt"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 5, {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_load_refuses_pickled_code(tmp_path):
    """weights_only: a checkpoint holding an arbitrary object is refused, not unpickled."""
    path = tmp_path / "step_00000001.pt"
    torch.save({"step": 1, "obj": _Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="will not unpickle") as caught:
        load_checkpoint(path)
    assert "weights_only=False" not in str(caught.value)  # never a suggestion to unpickle untrusted code


class _Arbitrary:
    pass


def test_export_safetensors_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).t()}
    export_safetensors(tmp_path / "x.safetensors", tensors, metadata={"step": "7"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == {"a", "b"} and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_skips_leftover_partial_file(tmp_path, tiny, capsys):
    """A partial temporary file left by a kill next to real checkpoints does not disturb --resume."""
    args = tiny + ["train.max_steps=2"]
    assert main(["--output-dir", str(tmp_path)] + args) == 0
    (tmp_path / "checkpoints" / ".step_00000003.pt.x1y2.tmp").write_bytes(b"\x80\x02half")
    capsys.readouterr()
    assert main(["--output-dir", str(tmp_path), "--resume"] + tiny + ["train.max_steps=3"]) == 0
    assert "at step 2" in capsys.readouterr().err
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 3


# the keys of a single-process checkpoint as fastjepa wrote them before TrainState (commit 51fa989)
SCHEMA_1_KEYS = {"step", "model", "target", "optimizer", "skipped_images", "skipped_steps", "nonfinite_run",
                 "torch_rng", "data", "config"}


def test_a_schema_1_checkpoint_resumes_exactly(tmp_path, tiny, helpers):
    """A checkpoint in the layout written before the TrainState schema (no ``schema`` key) resumes: the
    steps after it repeat an uninterrupted run's losses and final target encoder."""
    args = tiny + ["train.schedule_steps=4", "optim.warmup_steps=1"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["--output-dir", str(full), "train.max_steps=4"] + args) == 0
    assert main(["--output-dir", str(split), "train.max_steps=2"] + args) == 0
    path = latest_checkpoint(split / "checkpoints")
    state = load_checkpoint(path)
    assert set(state) - {"schema"} == SCHEMA_1_KEYS  # the schema kept its keys
    torch.save({k: v for k, v in state.items() if k in SCHEMA_1_KEYS}, path)  # as the old trainer wrote it
    assert main(["--output-dir", str(split), "--resume", "train.max_steps=4"] + args) == 0
    a, b = helpers.read_metrics(full), helpers.read_metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]
    ta, tb = load_file(full / "target_encoder.safetensors"), load_file(split / "target_encoder.safetensors")
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6)


def test_an_incomplete_checkpoint_names_what_it_lacks(tmp_path):
    from fastjepa.io.train_state import TrainState

    path = torch_save(checkpoint_file(tmp_path, 3), {"step": 3, "config": {}, "model": {}})
    with pytest.raises(CheckpointError, match="missing optimizer, target") as caught:
        TrainState.load(path, need=("model", "optimizer", "target"))
    assert str(path) in str(caught.value)
    with pytest.raises(CheckpointError, match="newer fastjepa"):
        TrainState.from_dict({"step": 1, "config": {}, "schema": 99})
