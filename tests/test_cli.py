"""The command line: ``fastjepa <command>``.

- bad config values: exit code 2, one line naming the key, nothing built (no output folder, torch never
  imported), wherever the ``key=value`` stands on the command line;
- ``--print-config`` prints the resolved config; ``--help`` lists every key of the config model with its
  description; the README's reference is the generated table;
- filesystem problems (a file where a folder should be, a path under a file, a read-only or full disk)
  are one line naming the path; ``FASTJEPA_DEBUG=1`` shows the traceback; bugs keep theirs;
- ``fastjepa export``: a run's target or context encoder, a ZeRO-3 tag's consolidated shards, timm weights.
"""
from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastjepa import cli
from fastjepa.config import SECTIONS, Config, load_config, markdown_table

REPO = Path(__file__).resolve().parents[1]

# the issue's list of values that used to train, crash or be replaced by a preset (override, key named)
ISSUE_BAD_VALUES = [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=NaN", "optim.lr"),
    ("optim.lr=Infinity", "optim.lr"),
    ("model.embed_dim=0", "model.embed_dim"),
    ("model.depth=0", "model.depth"),
    ("model.patch_size=0", "model.patch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("model.num_heads=7", "model.num_heads"),
    ("model.img_size=30", "model.img_size"),
    ("optim.lrr=1e-3", "optim.lrr"),  # an unknown key after --output-dir is still "did you mean"
]

# runs cli.main for every bad value in one child process, then says whether torch or the trainer were imported
CHILD = r"""
import contextlib, io, json, sys
from pathlib import Path
from fastjepa.cli import main
results = []
for i, override in enumerate(json.loads(sys.argv[1])):
    out = Path(sys.argv[2]) / f"run{i}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--config", "demo", "--output-dir", str(out), override, "--resume"])
    results.append({"rc": rc, "stderr": err.getvalue(), "made": out.exists()})
print(json.dumps({"results": results, "torch": "torch" in sys.modules, "trainer": "fastjepa.train" in sys.modules}))
"""


@pytest.mark.subprocess
def test_bad_values_exit_2_with_one_line_and_build_nothing(tmp_path, helpers):
    overrides = [o for o, _ in ISSUE_BAD_VALUES]
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides), str(tmp_path)], capture_output=True,
                           text=True, env=helpers.subprocess_env(), timeout=120)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    for (override, key), got in zip(ISSUE_BAD_VALUES, report["results"]):
        lines = got["stderr"].splitlines()
        assert got["rc"] == 2, (override, got)
        assert len(lines) == 1 and lines[0].startswith("fastjepa: error: "), (override, lines)
        assert f"'{key}'" in lines[0], (override, lines)
        assert not got["made"], f"{override}: the output folder was created"
    # nothing was built: neither torch nor the trainer was ever imported
    assert report["torch"] is False and report["trainer"] is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.subprocess
@pytest.mark.parametrize("debug", [False, True])
def test_traceback_only_with_fastjepa_debug(tmp_path, helpers, debug):
    env = helpers.subprocess_env()
    env.pop("FASTJEPA_DEBUG", None)
    if debug:
        env["FASTJEPA_DEBUG"] = "1"
    child = subprocess.run([sys.executable, "-m", "fastjepa", "train", "--output-dir", str(tmp_path / "o"),
                            "optim.lr=-1"], capture_output=True, text=True, env=env, timeout=120)
    assert child.returncode == (1 if debug else 2)
    if debug:
        assert "Traceback" in child.stderr and "ConfigError" in child.stderr and "optim.lr" in child.stderr
    else:
        assert child.stderr.strip().splitlines() == [
            "fastjepa: error: config key 'optim.lr': Input should be greater than 0 (got -1)"]


# ---- the command line's shape ---------------------------------------------------------------------

def test_overrides_anywhere_and_print_config(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["train", "optim.lr=5e-4", "--config", "demo", "train.max_steps=3", "--output-dir", str(out),
            "train.seed=4", "--resume", "mask.truncate=true", "--print-config", "data.root=/data/x"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    raw = json.loads((REPO / "src/fastjepa/configs/demo.json").read_text())
    assert printed == load_config("demo", ["optim.lr=5e-4", "train.max_steps=3", "train.seed=4", "mask.truncate=true",
                                           "data.root=/data/x"]).to_dict()
    assert (printed["optim"]["lr"], printed["train"]["max_steps"], printed["train"]["seed"]) == (5e-4, 3, 4)
    assert printed["mask"]["truncate"] is True and printed["data"]["root"] == "/data/x"
    assert printed["model"]["embed_dim"] == raw["model"]["embed_dim"]  # the rest is the preset's
    assert not out.exists()  # --print-config builds nothing


def test_checkout_script_path_resolves_the_packaged_preset(tmp_path):
    """``deepspeed fastjepa/train.py --config configs/vith14.json``: the script path a launcher is given
    runs the installed trainer, and the preset path resolves from the checkout's root."""
    proc = subprocess.run([sys.executable, "fastjepa/train.py", "--config", "configs/vith14.json", "--print-config"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == load_config("vith14").to_dict()
    assert load_config("vith14").model.arch == "huge" and load_config("vith14").model.patch_size == 14


def test_unknown_flags_are_still_argparse_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--output-dir", str(tmp_path), "--bogus", "optim.lr=1e-3"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_help_lists_every_key_with_its_description(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for section, field in Config.model_fields.items():  # every section of the model...
        assert f"config keys: {section}:" in text
        for name, key_field in field.annotation.model_fields.items():  # ...and every key in it
            key = f"{section}.{name}"
            description = " ".join((key_field.description or "").split())
            assert description, f"{key} has no description (Field(..., description=...))"
            assert f"\n  {key}: " in text, key
            assert description in flat, key
            default = key_field.default
            shown = default if isinstance(default, str) else json.dumps(list(default) if isinstance(default, tuple) else default)
            assert f"{key}: " in text and f"(default: {shown})" in text.split(f"\n  {key}: ", 1)[1].split("\n")[0], key


def test_readme_reference_is_the_generated_table():
    text = (REPO / "README.md").read_text()
    start = next(line for line in text.splitlines() if line.startswith("<!-- config-reference:start"))
    block = text.split(start + "\n", 1)[1].split("\n<!-- config-reference:end -->", 1)[0]
    assert block == markdown_table(), "README.md is stale: run python scripts/config_reference.py"
    keys = [row.split("|")[1].strip().strip("`") for row in block.splitlines()[2:]]
    assert keys == [f"{s}.{k}" for s, schema in SECTIONS.items() for k in schema.model_fields]


@pytest.mark.subprocess
def test_reference_script_checks_and_writes(tmp_path, helpers):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- config-reference:start (generated by scripts/config_reference.py from "
                      "src/fastjepa/config.py) -->\n| old |\n<!-- config-reference:end -->\ntail\n")
    script = [sys.executable, str(REPO / "scripts/config_reference.py"), "--readme", str(readme)]
    env = helpers.subprocess_env()
    assert subprocess.run([*script, "--check"], env=env, capture_output=True, timeout=60).returncode == 1
    assert subprocess.run(script, env=env, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run([*script, "--check"], env=env, capture_output=True, timeout=60).returncode == 0
    assert markdown_table() in readme.read_text() and readme.read_text().endswith("end -->\ntail\n")


def test_usage_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "probe", "knn", "convert", "export", "plot", "bench-report"):
        assert f"\n  {command} " in out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_a_command_whose_module_is_missing_says_so(monkeypatch, capsys):
    """plot and bench-report are imported when run: until their modules exist, one line, exit code 2."""
    monkeypatch.setitem(cli.COMMANDS, "plot", ("x", cli._module_main("fastjepa.no_such_module", "plot")))
    assert cli.main(["plot", "metrics.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == ("fastjepa: error: 'fastjepa plot' is not available in this "
                                               "installation (no module fastjepa.no_such_module)")


# ---- filesystem errors ----------------------------------------------------------------------------

def _train_error(argv, capsys) -> str:
    assert cli.main(["train", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastjepa: error: "), lines
    return lines[0]


# the output folder's own problems (a file, under a file, read-only, full): tests/test_faults.py


class _FailingTrainer:
    """Stands in for the trainer: its train() raises what it was given."""
    error: BaseException

    def __init__(self, *args, **kwargs):
        pass

    def train(self):
        raise self.error


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/checkpoints/step_00000010.pt"),
     "no space left on the device writing '/runs/x/checkpoints/step_00000010.pt'"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), os.strerror(errno.ENOSPC)),  # a write() with no path
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs/x/metrics.jsonl"),
     "permission denied: '/runs/x/metrics.jsonl'"),
    (ModuleNotFoundError("No module named 'tensorboard'", name="tensorboard"),
     "this needs the Python package 'tensorboard', which is not installed"),
])
def test_user_errors_during_the_run_are_one_line(tmp_path, tiny, capsys, monkeypatch, error, line):
    import fastjepa.train

    monkeypatch.setattr(fastjepa.train, "Trainer", type("T", (_FailingTrainer,), {"error": error}))
    assert _train_error(["--output-dir", str(tmp_path / "o"), *tiny], capsys) == f"fastjepa: error: {line}"


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("model"), OSError(errno.EIO, "I/O error", "/x"),
                                   ModuleNotFoundError("No module named 'fastjepa.gone'", name="fastjepa.gone")])
def test_bugs_keep_their_traceback(tmp_path, tiny, monkeypatch, error):
    import fastjepa.train

    monkeypatch.setattr(fastjepa.train, "Trainer", type("T", (_FailingTrainer,), {"error": error}))
    with pytest.raises(type(error)):
        cli.main(["train", "--output-dir", str(tmp_path / "o"), *tiny])


def test_start_up_checks_are_one_line(tmp_path, tiny, capsys):
    line = _train_error(["--output-dir", str(tmp_path / "o"), *tiny, "data.dataset=folder"], capsys)
    assert "data.root" in line


def test_real_os_errors_read_as_one_line(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    cases = []
    for action in (lambda: open(tmp_path, "w"), lambda: open(a_file / "x", "w"), lambda: a_file.mkdir(),
                   lambda: open(tmp_path / "missing"), lambda: (tmp_path / "a" / "b").rmdir()):
        with pytest.raises(OSError) as err:
            action()
        cases.append(cli.describe_os_error(err.value))
    assert cases == [f"'{tmp_path}' is a folder, not a file", f"'{a_file / 'x'}': '{a_file}' is a file, not a folder",
                     f"'{a_file}' is a file, not a folder", f"'{tmp_path / 'missing'}' does not exist",
                     f"'{tmp_path / 'a' / 'b'}' does not exist"]
    if Path("/dev/full").exists():  # a real full device
        with pytest.raises(OSError) as err, open("/dev/full", "wb", buffering=0) as full:
            full.write(b"x")
        assert err.value.errno == errno.ENOSPC and cli.describe_os_error(err.value) == os.strerror(errno.ENOSPC)


# ---- fastjepa export --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, helpers):
    """A 2-step tiny run, its overrides split around --output-dir (they all count)."""
    out = tmp_path_factory.mktemp("export") / "run"
    overrides = [*helpers.TINY, "train.max_steps=2", "train.checkpoint_every=1"]
    assert cli.main(["train", *overrides[:6], "--output-dir", str(out), *overrides[6:]]) == 0
    assert json.loads((out / "config.json").read_text()) == load_config(None, overrides).to_dict()
    return out


def _features(path, **kw):
    import fastjepa

    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        return fastjepa.load_encoder(path, **kw)(images)


def test_export_target_and_context(run_dir, tmp_path, capsys):
    from fastjepa.io.files import newest_checkpoint_file, read_weights

    out = tmp_path / "elsewhere" / "target.safetensors"  # no config.json beside it: the metadata carries it
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    exported, reference = load_file(out), load_file(run_dir / "target_encoder.safetensors")
    assert summary["tensors"] == len(reference) and exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    torch.testing.assert_close(_features(out), _features(run_dir), rtol=0, atol=0)

    context = tmp_path / "context.safetensors"
    assert cli.main(["export", str(run_dir), str(context), "--weights", "context"]) == 0
    checkpoint = read_weights(newest_checkpoint_file(run_dir / "checkpoints"))[0]
    want = {k.removeprefix("encoder."): v for k, v in checkpoint["model"].items() if k.startswith("encoder.")}
    got = load_file(context)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _write_zero3_tag(tag: Path, state: dict, world: int) -> None:
    """The ZeRO-3 target shard files as the trainer writes them: each parameter flattened to fp32, split
    into ``world`` slices of ceil(numel / world) elements, the last zero-padded."""
    tag.mkdir(parents=True)
    shapes = {k: list(v.shape) for k, v in state.items()}
    for rank in range(world):
        slices = {}
        for name, tensor in state.items():
            per = math.ceil(tensor.numel() / world)
            flat = torch.zeros(per * world)
            flat[: tensor.numel()] = tensor.reshape(-1).float()
            slices[name] = flat[rank * per:(rank + 1) * per].clone()
        save_file(slices, str(tag / f"fastjepa_target_rank{rank:05d}_of_{world:05d}.safetensors"),
                  metadata={"shapes": json.dumps(shapes), "world": str(world), "rank": str(rank)})


def test_export_zero3_tag_and_run(run_dir, tmp_path, capsys):
    reference = load_file(run_dir / "target_encoder.safetensors")
    zero_run = tmp_path / "zero_run"
    tag = zero_run / "checkpoints" / "deepspeed" / "step_00000002"
    _write_zero3_tag(tag, reference, world=3)
    (tag.parent / "latest").write_text("step_00000002")
    (zero_run / "config.json").write_text((run_dir / "config.json").read_text())
    for source in (tag, zero_run):  # the tag itself, or the run whose `latest` names it
        out = tmp_path / f"{source.name}.safetensors"
        assert cli.main(["export", str(source), str(out)]) == 0, capsys.readouterr().err
        got = load_file(out)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)
        torch.testing.assert_close(_features(out), _features(run_dir), rtol=0, atol=0)
    capsys.readouterr()
    # the context encoder is not in the shards; a tag outside its run needs --config
    assert cli.main(["export", str(tag), str(tmp_path / "c.safetensors"), "--weights", "context"]) == 2
    assert "ZeRO-3 tag" in capsys.readouterr().err
    lonely = tmp_path / "lonely" / "step_00000002"
    _write_zero3_tag(lonely, reference, world=2)
    assert cli.main(["export", str(lonely), str(tmp_path / "l.safetensors")]) == 2
    assert "--config" in capsys.readouterr().err
    assert cli.main(["export", str(lonely), str(tmp_path / "l.safetensors"), "--config", str(run_dir / "config.json")]) == 0


def test_export_timm_matches_convert(run_dir, tmp_path, capsys):
    from fastjepa.io import convert

    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    assert cli.main(["export", str(run_dir), str(ours), "--format", "timm"]) == 0
    assert convert.main(["--from", "fastjepa", "--to", "timm", str(run_dir), str(theirs)]) == 0
    a, b = load_file(ours), load_file(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_errors_are_one_line(run_dir, tmp_path, capsys):
    for argv, needle in [([str(tmp_path / "missing"), str(tmp_path / "o.safetensors")], "missing"),
                         ([str(run_dir), str(tmp_path / "o.bin")], "o.bin"),
                         ([str(run_dir), str(run_dir / "config.json" / "o.safetensors")], "is a file, not a folder")]:
        assert cli.main(["export", *argv]) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastjepa: error: ") and needle in lines[0], (argv, lines)
