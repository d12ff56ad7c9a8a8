"""Tests of the one atomic-write helper (imaml_kernels._atomic) and of the writers built on it:
checkpoints, ``evaluate.write_json``, the trainer's curves PNG and the data converters.

The old writers used fixed temporary names (``.eval.json.tmp``, ``.curves.png.tmp.png``,
``.metrics.jsonl.tmp``); a symlink planted there must not be written through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from imaml_kernels._atomic import atomic_write, write_bytes, write_text
from imaml_kernels.trainer.checkpoint import load_checkpoint, save_checkpoint
from imaml_kernels.data.files import save_npz_atomic
from imaml_kernels.trainer.evaluate import write_json


class Boom(RuntimeError):
    pass


class Unpicklable:
    def __reduce__(self):
        raise Boom("cannot be pickled")


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of the helper left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _plant(folder: Path, name: str) -> Path:
    """A symlink ``folder/name`` to a victim file outside the folder; returns the victim."""
    victim = folder.parent / f"victim-{name.strip('.')}"
    victim.write_text("precious")
    (folder / name).symlink_to(victim)
    return victim


# ------------------------------------------------------------------ the helper


def test_binary_and_text_writes(tmp_path):
    with atomic_write(tmp_path / "a.bin") as f:
        f.write(b"\x00\x01")
    with atomic_write(tmp_path / "b.txt", "w") as f:
        f.write("λ = 1\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "λ = 1\n"
    assert write_text(tmp_path / "sub" / "c.txt", "x") == tmp_path / "sub" / "c.txt"  # makes the folder
    assert write_bytes(tmp_path / "d.bin", b"y").read_bytes() == b"y"
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_permissions_are_those_of_open(tmp_path):
    (tmp_path / "plain").write_text("")
    write_text(tmp_path / "atomic", "")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "x", "a"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_failure_in_the_block_keeps_the_target_and_removes_the_temp_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(Boom), atomic_write(target) as f:
        f.write(b"half a new fi")
        assert _leftovers(tmp_path)  # written beside the target meanwhile
        raise Boom
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_failed_rename_removes_the_temp_file(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "keep").write_text("")
    with pytest.raises(OSError):
        write_text(target, "not over a folder")
    assert target.is_dir() and _leftovers(tmp_path) == []


def test_failed_fsync_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old")

    def fail(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_text(target, "new")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_temp_names_are_unique_and_not_fixed(tmp_path):
    target = tmp_path / "eval.json"
    with atomic_write(target, "w") as a, atomic_write(target, "w") as b:
        a.write("a")
        b.write("b")
        names = _leftovers(tmp_path)
    assert len(names) == 2 and f".{target.name}.tmp" not in names
    assert all(n.startswith(".eval.json.") and n.endswith(".tmp") for n in names)
    assert target.read_text() == "a" and _leftovers(tmp_path) == []  # the last to finish wins


@pytest.mark.parametrize("name", [".eval.json.tmp", ".eval.json.tmp.tmp"])
def test_symlink_at_a_predictable_name_is_not_followed(tmp_path, name):
    victim = _plant(tmp_path, name)
    write_text(tmp_path / "eval.json", "{}")
    assert victim.read_text() == "precious"
    assert (tmp_path / name).is_symlink() and (tmp_path / "eval.json").read_text() == "{}"


def test_symlink_at_the_target_is_replaced_not_written_through(tmp_path):
    victim = _plant(tmp_path, "eval.json")
    write_text(tmp_path / "eval.json", "{}")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "eval.json").is_symlink() and (tmp_path / "eval.json").read_text() == "{}"


# ------------------------------------------------------------------ the writers on top


def test_write_json_ignores_a_planted_symlink(tmp_path):
    victim = _plant(tmp_path, ".eval.json.tmp")
    write_json(tmp_path / "eval.json", {"accuracy": 0.5})
    assert json.loads((tmp_path / "eval.json").read_text()) == {"accuracy": 0.5}
    assert victim.read_text() == "precious" and _leftovers(tmp_path) == [".eval.json.tmp"]


def test_failed_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "config": {}, "model": {"w": torch.ones(2)}})
    with pytest.raises(Boom):
        save_checkpoint(path, {"step": 2, "config": {}, "model": {"w": Unpicklable()}})  # fails while saving
    assert load_checkpoint(path)["step"] == 1
    assert _leftovers(tmp_path) == []


def test_curves_png_ignores_a_planted_symlink(tmp_path):
    from imaml_kernels.trainer.plots import plot_curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 1.0 / s, "acc": 0.2}) + "\n"
                               for s in range(1, 5)))
    victim = _plant(tmp_path, ".curves.png.tmp.png")
    assert plot_curves(metrics, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert victim.read_text() == "precious" and (tmp_path / ".curves.png.tmp.png").is_symlink()
    assert _leftovers(tmp_path) == []


def test_data_writers_ignore_planted_symlinks(tmp_path):
    victim = _plant(tmp_path, ".characters.json.tmp")
    write_text(tmp_path / "characters.json", "{}")
    save_npz_atomic(tmp_path / "x.npz", images=np.zeros((2, 3), np.uint8))
    assert victim.read_text() == "precious" and (tmp_path / "characters.json").read_text() == "{}"
    assert np.load(tmp_path / "x.npz")["images"].shape == (2, 3)
    assert _leftovers(tmp_path) == [".characters.json.tmp"]
