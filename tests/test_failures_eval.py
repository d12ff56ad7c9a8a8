"""Failures of ``imaml-eval`` and of the checkpoint loader (issue 13, "a run is never lost"):
each is one ``imaml-eval: error: ...`` line on stderr with exit status 2, no traceback, and
the argument / destination / checkpoint checks come before any data is loaded.

``imaml_kernels.trainer.evaluate.main`` runs in-process. Most checkpoints are built directly with
``save_checkpoint`` (no data needed); the tests that evaluate, or that poison a real
checkpoint with a NaN, share one 1-step training run on real Omniglot ($IMAML_DATA; skipped
when absent).
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from imaml_kernels.trainer import builders
from imaml_kernels.trainer import evaluate as evaluate_mod
from imaml_kernels.trainer.builders import build_model
from imaml_kernels.trainer.checkpoint import (
    CheckpointError,
    check_model_state,
    checkpoint_config,
    load_checkpoint,
    save_checkpoint,
)
from imaml_kernels.data import omniglot_root
from imaml_kernels.data.omniglot import load_omniglot_arrays
from imaml_kernels.trainer.evaluate import main as eval_main
from imaml_kernels.trainer.presets import resolve_config
from imaml_kernels.trainer.cli import main as train_main

HAVE_OMNIGLOT = (omniglot_root() / "characters.json").is_file()
needs_omniglot = pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found in $IMAML_DATA")

TINY = {"meta_batch": 2, "inner_steps": 2, "channels": 8, "eval_tasks": 0, "steps": 1}


def one_line_error(capsys) -> str:
    """The single ``imaml-eval: error:`` line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("imaml-eval: error: "), err
    assert "Traceback" not in err
    return lines[0]


def synthetic_checkpoint(path: Path, *, config=None, model=None, step: int = 1) -> Path:
    """A checkpoint of the tiny configuration with freshly initialised weights (no data)."""
    cfg = resolve_config("omniglot-5w1s", TINY) if config is None else config
    if model is None:
        torch.manual_seed(0)
        model = build_model(resolve_config("omniglot-5w1s", TINY)).state_dict()
    return save_checkpoint(path, {"step": step, "config": cfg, "model": model})


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return synthetic_checkpoint(tmp_path / "run" / "ckpt.pt")


@pytest.fixture
def no_work(monkeypatch):
    """Loading data or evaluating is a test failure: the error must come before."""

    def boom(*a, **k):
        raise AssertionError("imaml-eval started work before refusing")

    monkeypatch.setattr(builders, "build_samplers", boom)
    monkeypatch.setattr(evaluate_mod, "evaluate", boom)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """One meta-step of a tiny configuration on real Omniglot: a real ckpt.pt."""
    if not HAVE_OMNIGLOT:
        pytest.skip("Omniglot not found in $IMAML_DATA")
    out = tmp_path_factory.mktemp("real_run")
    argv = ["--preset", "omniglot-5w1s", "--meta-batch", "2", "--inner-steps", "2", "--channels", "8",
            "--eval-tasks", "0", "--threads", "1", "--steps", "1", "--no-progress", "--out", str(out)]
    assert train_main(argv) == 0
    return out


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "flag,value", [("--threads", "0"), ("--batch", "0"), ("--tasks", "0"), ("--tasks", "-5")]
)
def test_counts_below_one(ckpt, no_work, capsys, flag, value):
    assert eval_main([str(ckpt), flag, value]) == 2
    msg = one_line_error(capsys)
    assert f"{flag} must be >= 1, got {value}" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(ckpt, no_work, capsys):
    assert eval_main([str(ckpt), "--device", "cuda"]) == 2
    assert one_line_error(capsys) == "imaml-eval: error: --device cuda: CUDA is not available on this machine"


@pytest.mark.parametrize("spec", ["foo", "cuda:x", "meta"])
def test_unknown_or_unusable_device(ckpt, no_work, capsys, spec):
    assert eval_main([str(ckpt), "--device", spec]) == 2
    assert f"--device {spec}:" in one_line_error(capsys)


def test_json_is_a_folder(ckpt, no_work, tmp_path, capsys):
    folder = tmp_path / "already_a_folder"
    folder.mkdir()
    assert eval_main([str(ckpt), "--json", str(folder)]) == 2
    msg = one_line_error(capsys)
    assert f"--json {folder}: is a folder" in msg


@pytest.mark.parametrize("depth", [1, 2], ids=["parent-is-file", "ancestor-is-file"])
def test_json_parent_is_a_file(ckpt, no_work, tmp_path, capsys, depth):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "result.json" if depth == 1 else blocker / "sub" / "result.json"
    assert eval_main([str(ckpt), "--json", str(target)]) == 2
    msg = one_line_error(capsys)
    assert f"--json {target}" in msg and f"{blocker} is not a folder" in msg


def _read_only(monkeypatch, folder: Path) -> None:
    """``os.access(folder, W_OK)`` is False (chmod is no use: the tests run as root)."""
    real = os.access
    folder = folder.resolve()

    def access(path, mode, *a, **k):
        if Path(path).resolve() == folder and mode & os.W_OK:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)


def test_json_in_read_only_folder(ckpt, no_work, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    # A missing subfolder would be created inside ro: ro is the folder that must be writable.
    for target in (ro / "e.json", ro / "new" / "e.json"):
        assert eval_main([str(ckpt), "--json", str(target)]) == 2
        msg = one_line_error(capsys)
        assert f"--json {target}: the folder {ro} is not writable" in msg
    assert not (ro / "new").exists()


def test_default_json_next_to_checkpoint_in_read_only_folder(ckpt, no_work, monkeypatch, capsys):
    _read_only(monkeypatch, ckpt.parent)
    assert eval_main([str(ckpt.parent), "--tasks", "7"]) == 2
    msg = one_line_error(capsys)
    expected = ckpt.parent / "eval_seed0_7.json"
    assert f"cannot write the result to {expected}: the folder {ckpt.parent} is not writable" in msg
    assert "--json" in msg  # says how to write it elsewhere


@needs_omniglot
def test_oserror_while_writing_the_result(real_run, tmp_path, monkeypatch, capsys):
    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(evaluate_mod, "write_text", full_disk)
    out = tmp_path / "e.json"
    argv = [str(real_run), "--tasks", "2", "--batch", "2", "--threads", "1", "--json", str(out)]
    assert eval_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("meta-test accuracy: ")  # the result itself is not lost
    lines = [x for x in captured.err.splitlines() if x.strip()]
    assert lines == [f"imaml-eval: error: cannot write the result to {out}: {os.strerror(errno.ENOSPC)}"]
    assert not out.exists()


# ------------------------------------------------------------------ checkpoints


@needs_omniglot
def test_non_finite_checkpoint_is_refused(real_run, tmp_path, no_work, capsys):
    state = load_checkpoint(real_run / "ckpt.pt")
    names = [k for k, v in state["model"].items() if v.is_floating_point()]
    bad = names[len(names) // 2]
    state["model"][bad].view(-1)[0] = float("nan")
    del state["version"]
    path = save_checkpoint(tmp_path / "diverged" / "ckpt.pt", state)
    expected = (
        f"{path}: holds non-finite parameters ({bad}): the run diverged; "
        f"resume or evaluate an earlier checkpoint"
    )
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == expected
    assert load_checkpoint(path, check_finite=False)["step"] == 1  # still readable on request
    assert eval_main([str(path.parent)]) == 2
    assert one_line_error(capsys) == f"imaml-eval: error: {expected}"


def test_infinity_in_a_buffer_is_refused(tmp_path):
    torch.manual_seed(0)
    model = build_model(resolve_config("omniglot-5w1s", TINY)).state_dict()
    name = next(k for k, v in model.items() if v.is_floating_point())
    model[name] = torch.full_like(model[name], float("inf"))
    path = synthetic_checkpoint(tmp_path / "ckpt.pt", model=model)
    with pytest.raises(CheckpointError, match=rf"holds non-finite parameters \({name}\)"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("config", [1, 2], "its config is a list, not a dict"),
        ("config", None, "its config is None, not a dict"),
        ("model", [torch.ones(1)], "its model state is a list, not a dict of tensors"),
        ("model", {"w": 1.5}, "its model state is not a dict of tensors ('w': a float)"),
        ("step", "3", "its step is '3', not a non-negative integer"),
    ],
)
def test_malformed_checkpoint(tmp_path, no_work, capsys, field, value, message):
    state = {"step": 1, "config": resolve_config("omniglot-5w1s", TINY), "model": {"w": torch.ones(1)}}
    state[field] = value
    path = save_checkpoint(tmp_path / "ckpt.pt", state)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: {message}"
    assert eval_main([str(path)]) == 2
    assert one_line_error(capsys) == f"imaml-eval: error: {path}: {message}"


@pytest.mark.parametrize("missing", [["way"], ["dataset", "lam"]])
def test_config_lacks_a_key(tmp_path, no_work, capsys, missing):
    cfg = resolve_config("omniglot-5w1s", TINY)
    for k in missing:
        del cfg[k]
    path = synthetic_checkpoint(tmp_path / "ckpt.pt", config=cfg)
    assert eval_main([str(path)]) == 2
    lacks = ", ".join(repr(k) for k in missing)
    assert one_line_error(capsys) == f"imaml-eval: error: {path}: its config lacks {lacks}"


@pytest.mark.parametrize("key,value", [("way", "five"), ("lam", -1.0), ("dataset", "mnist")])
def test_config_with_a_bad_value(tmp_path, no_work, capsys, key, value):
    cfg = dict(resolve_config("omniglot-5w1s", TINY), **{key: value})
    path = synthetic_checkpoint(tmp_path / "ckpt.pt", config=cfg)
    assert eval_main([str(path)]) == 2
    msg = one_line_error(capsys)
    assert f"{path}: its config is invalid (" in msg and key in msg


def test_checkpoint_config_fills_query_and_copies(tmp_path):
    cfg = dict(resolve_config("omniglot-5w1s", TINY), query=None)
    state = {"config": cfg}
    got = checkpoint_config(state, tmp_path / "ckpt.pt")
    assert got["query"] == got["shot"] and cfg["query"] is None


def test_model_that_does_not_match_its_config(tmp_path, no_work, capsys):
    # Weights of a 16-filter network under a config that says 8 filters.
    torch.manual_seed(0)
    wide = build_model(resolve_config("omniglot-5w1s", dict(TINY, channels=16))).state_dict()
    path = synthetic_checkpoint(tmp_path / "ckpt.pt", model=wide)
    assert eval_main([str(path)]) == 2
    msg = one_line_error(capsys)
    assert f"imaml-eval: error: {path}: its model does not match its config (size mismatch: [" in msg
    assert "checkpoint [16," in msg and "vs model [8," in msg


def test_check_model_state_names_missing_and_unexpected_keys(tmp_path):
    cfg = resolve_config("omniglot-5w1s", TINY)
    model = build_model(cfg)
    state = dict(model.state_dict())
    gone = next(iter(state))
    del state[gone]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(CheckpointError) as err:
        check_model_state(model, state, path)
    msg = str(err.value)
    assert msg == f"{path}: its model does not match its config (missing: [{gone}], unexpected: [extra.weight])"
    assert "\n" not in msg

    # A matching state loads (strict) into the model.
    other = build_model(cfg)
    check_model_state(other, model.state_dict(), path)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)


# ------------------------------------------------------------------ data


def _linked_omniglot(tmp_path: Path, edit) -> Path:
    """A data folder: the real npz files symlinked, characters.json edited by ``edit(meta)``."""
    src = omniglot_root()
    root = tmp_path / "omniglot"
    root.mkdir()
    for npz in src.glob("*.npz"):
        (root / npz.name).symlink_to(npz)
    meta = json.loads((src / "characters.json").read_text())
    edit(meta)
    (root / "characters.json").write_text(json.dumps(meta))
    return root


def _set(split, field, value):
    def edit(meta):
        meta[split][field] = value
    return edit


def _set_item(split, field, i, value):
    def edit(meta):
        meta[split][field][i] = value
    return edit


@needs_omniglot
@pytest.mark.parametrize(
    "edit,pattern",
    [
        (_set("background", "characters", 5), r"expected 'background' with 964 'characters' .*found 'characters': int"),
        (_set("evaluation", "character_ids", "x"), r"found 'character_ids': str"),
        (lambda m: m["background"].pop("characters"), r"found no 'characters'"),
        (lambda m: m.update(evaluation=[]), r"expected 'evaluation' with 659 .*found list"),
        (_set_item("background", "characters", 3, 7),
         r"'background' 'characters'\[3\] must be a name \(str\), found int 7"),
        (_set_item("evaluation", "character_ids", 0, None), r"'evaluation' 'character_ids'\[0\] must be an integer id"),
    ],
    ids=["characters-int", "ids-str", "characters-missing", "split-list", "name-int", "id-null"],
)
def test_malformed_characters_json(tmp_path, capsys, edit, pattern):
    root = _linked_omniglot(tmp_path, edit)
    meta_path = root / "characters.json"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(meta_path))}: .*{pattern}") as err:
        load_omniglot_arrays(root)
    assert "\n" not in str(err.value)
    ckpt = synthetic_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert eval_main([str(ckpt), "--data-root", str(root)]) == 2
    msg = one_line_error(capsys)
    assert str(meta_path) in msg
