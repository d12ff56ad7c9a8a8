"""Tests of imaml_kernels.data: Omniglot / MiniImagenet loading and conversion, the task sampler, the CLI.

Real Omniglot is read from $IMAML_DATA, else ../shared/data/omniglot next to the
repository; those tests are skipped when it is absent. Everything else builds
small data in the real formats under tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imaml_kernels.data import (
    TaskSampler,
    convert_miniimagenet,
    convert_omniglot_zips,
    detect_miniimagenet_layout,
    load_miniimagenet,
    load_omniglot,
    load_omniglot_arrays,
    miniimagenet_samplers,
    omniglot_root,
    omniglot_samplers,
    omniglot_split,
    prepare_omniglot,
)
from imaml_kernels.data import download as dl
from imaml_kernels.data.__main__ import main as cli_main

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = Path(os.environ.get("IMAML_DATA") or REPO.parent / "shared" / "data" / "omniglot")
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT_DIR / "characters.json").is_file(), reason=f"real Omniglot not found in {OMNIGLOT_DIR}"
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OMNIGLOT_FILES = [f"images_{s}_{n}.npz" for s in ("background", "evaluation") for n in (105, 28)]
OMNIGLOT_FILES.append("characters.json")


@pytest.fixture(scope="module")
def omniglot():
    if not (OMNIGLOT_DIR / "characters.json").is_file():
        pytest.skip(f"real Omniglot not found in {OMNIGLOT_DIR}")
    return load_omniglot(OMNIGLOT_DIR)


def linked_copy(tmp_path: Path) -> Path:
    """A folder of symlinks to the real Omniglot files, so one can be replaced cheaply."""
    root = tmp_path / "omniglot"
    root.mkdir(parents=True)
    for name in OMNIGLOT_FILES:
        (root / name).symlink_to(OMNIGLOT_DIR / name)
    return root


def replace_npz(root: Path, name: str, arr: np.ndarray) -> Path:
    path = root / name
    path.unlink()
    np.savez_compressed(path, images=arr)
    return path


# ============================================================================
# Omniglot: real data
# ============================================================================


@needs_omniglot
def test_load_shapes_and_values(omniglot):
    assert omniglot["train"].shape == (1200, 20, 1, 28, 28)
    assert omniglot["test"].shape == (423, 20, 1, 28, 28)
    assert omniglot["train"].dtype == torch.float32
    assert len(omniglot["train_classes"]) == 1200 and len(omniglot["test_ids"]) == 423
    raw = load_omniglot_arrays(OMNIGLOT_DIR)
    assert raw["images"].shape == (1623, 20, 28, 28)
    # Row r of train is pooled row train_rows[r], with ink (0) -> 1.0 and paper (255) -> 0.0.
    rows, _ = omniglot_split(raw["characters"], "imaml")
    r = int(np.random.default_rng().integers(1200))
    expected = 1.0 - raw["images"][rows[r]].astype(np.float64) / 255.0
    np.testing.assert_allclose(omniglot["train"][r, :, 0].numpy(), expected, rtol=0, atol=1e-7)
    x = omniglot["train"]
    assert x.min() == 0.0 and x.max() == 1.0
    assert 0.02 < x.mean() < 0.3  # mostly paper: the ink convention is not inverted


@needs_omniglot
def test_imaml_split_disjoint_pooled_and_fixed(omniglot):
    train, test = set(omniglot["train_classes"]), set(omniglot["test_classes"])
    assert len(train) == 1200 and len(test) == 423 and not train & test
    raw = load_omniglot_arrays(OMNIGLOT_DIR)
    assert train | test == set(raw["characters"])
    assert set(omniglot["train_ids"]) | set(omniglot["test_ids"]) == set(range(1, 1624))
    # Pooled: both parts draw from background (rows < 964) and evaluation.
    tr, te = omniglot_split(raw["characters"], "imaml")
    assert 0 < sum(i >= 964 for i in tr) < 659 and 0 < sum(i < 964 for i in te) < 964
    # The split is part of the protocol: changing it silently would change every result.
    names = "\n".join(omniglot["test_classes"]).encode()
    assert hashlib.sha256(names).hexdigest()[:16] == "7d6083da387e48a6"


@needs_omniglot
def test_vinyals_and_explicit_split():
    raw = load_omniglot_arrays(OMNIGLOT_DIR)
    data = load_omniglot(OMNIGLOT_DIR, split="vinyals")
    assert data["train_classes"] == raw["characters"][:1200]
    assert data["test_classes"][0] == "Gurmukhi/character42"
    pick = {"train": raw["characters"][5:8], "test": [raw["characters"][1000]]}
    data = load_omniglot(OMNIGLOT_DIR, split=pick)
    assert data["train"].shape[0] == 3 and data["test_classes"] == pick["test"]
    with pytest.raises(ValueError, match="overlap"):
        omniglot_split(raw["characters"], {"train": pick["train"], "test": pick["train"][:1]})
    with pytest.raises(ValueError, match="split must be"):
        omniglot_split(raw["characters"], "random")


@needs_omniglot
def test_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAML_DATA", str(OMNIGLOT_DIR))
    assert omniglot_root() == OMNIGLOT_DIR
    assert load_omniglot()["test"].shape[0] == 423
    assert omniglot_root(tmp_path) == tmp_path  # explicit root wins
    monkeypatch.delenv("IMAML_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / "imaml_kernels" / "omniglot"
    assert omniglot_root() == expected
    with pytest.raises(FileNotFoundError) as err:
        load_omniglot()
    msg = str(err.value)
    hints = ("imaml-data omniglot --root", "python -m imaml_kernels.data omniglot", "IMAML_DATA")
    for part in (str(expected), *hints):
        assert part in msg


def test_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing images_background_28.npz"):
        load_omniglot(tmp_path / "nowhere")


@needs_omniglot
def test_corrupt_files(tmp_path):
    root = linked_copy(tmp_path)
    path = root / "images_background_28.npz"
    data = (OMNIGLOT_DIR / path.name).read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"images_background_28\.npz: cannot be read.*truncated or corrupt"):
        load_omniglot(root)

    replace_npz(root, path.name, np.zeros((964, 20, 28, 27), np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 \[964, 20, 28, 28\], found uint8 \[964, 20, 28, 27\]"):
        load_omniglot(root)
    replace_npz(root, path.name, np.zeros((964, 20, 28, 28), np.int16))
    with pytest.raises(ValueError, match=r"found int16"):
        load_omniglot(root)

    root = linked_copy(tmp_path / "b")
    meta = json.loads((OMNIGLOT_DIR / "characters.json").read_text())
    meta["evaluation"]["characters"].pop()
    (root / "characters.json").unlink()
    (root / "characters.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"characters\.json: expected 'evaluation' with 659"):
        load_omniglot(root)


@needs_omniglot
def test_verify_checksums(tmp_path):
    load_omniglot_arrays(OMNIGLOT_DIR, verify=True)  # 28x28 + characters.json; 105 is slower
    root = linked_copy(tmp_path)
    arr = np.load(OMNIGLOT_DIR / "images_evaluation_28.npz")["images"]
    # Same pixels, different zip container (timestamps): accepted by the content hash.
    replace_npz(root, "images_evaluation_28.npz", arr)
    load_omniglot_arrays(root, verify=True)
    arr = arr.copy()
    arr[3, 4, 5, 6] ^= 1
    replace_npz(root, "images_evaluation_28.npz", arr)
    load_omniglot_arrays(root)  # the shape is right, so only verify notices
    with pytest.raises(ValueError, match=r"images_evaluation_28\.npz: sha256 .*Pillow"):
        load_omniglot_arrays(root, verify=True)


def test_characters_json_layout_is_reproduced():
    path = OMNIGLOT_DIR / "characters.json"
    if not path.is_file():
        pytest.skip("real Omniglot absent")
    raw = path.read_text()
    meta = json.loads(raw)
    # The converter writes json.dumps(meta, indent=1) with this note: the reference bytes.
    assert json.dumps(meta, indent=1) == raw
    assert meta["note"] == dl._OMNIGLOT_NOTE
    assert list(meta) == ["background", "evaluation", "note"]


# ============================================================================
# Task sampler
# ============================================================================


def expected_images(images: torch.Tensor, idx) -> torch.Tensor:
    """[T, way, n, ch, H, W] float64 reference built one image at a time."""
    T, way, n = idx.drawings.shape
    out = torch.empty((T, way, n) + images.shape[2:], dtype=torch.float64)
    for t in range(T):
        for j in range(way):
            for i in range(n):
                img = images[idx.classes[t, j], idx.drawings[t, j, i]].double()
                out[t, j, i] = torch.rot90(img, int(idx.rotations[t, j]), dims=(-2, -1))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "C,N,ch,H,way,shot,query,T,rotate",
    [
        (7, 20, 1, 5, 5, 1, 15, 1, True),
        (30, 9, 3, 6, 20, 5, 4, 3, True),
        (4, 3, 2, 4, 3, 2, 0, 32, False),
        (13, 20, 1, 7, 13, 1, 19, 5, False),
    ],
    ids=lambda v: str(v),
)
def test_sampler_matches_reference(device, C, N, ch, H, way, shot, query, T, rotate):
    images = torch.rand(C, N, ch, H, H)
    s = TaskSampler(images, way, shot, query, rotate=rotate, device=device, seed=int(torch.randint(1 << 30, ())))
    idx = s.draw(T)
    x_s, y_s, x_q, y_q = s.build(idx)
    assert x_s.shape == (T, way * shot, ch, H, H) and x_q.shape == (T, way * query, ch, H, H)
    assert x_s.dtype == x_q.dtype == torch.float32 and y_s.dtype == y_q.dtype == torch.int64
    assert x_s.device.type == y_q.device.type == device
    labels = torch.arange(way).repeat_interleave(shot)
    assert torch.equal(y_s.cpu(), labels.expand(T, -1))
    assert torch.equal(y_q.cpu(), torch.arange(way).repeat_interleave(query).expand(T, -1))
    idx = type(idx)(*(t.cpu() for t in idx))
    # Classes distinct within a task; support and query drawings distinct within a class.
    assert all(len(set(row.tolist())) == way for row in idx.classes)
    assert all(len(set(d.tolist())) == shot + query for d in idx.drawings.reshape(-1, shot + query))
    assert idx.classes.max() < C and idx.drawings.max() < N
    ref = expected_images(images, idx)
    got = torch.cat([x_s.view(T, way, shot, ch, H, H), x_q.view(T, way, query, ch, H, H)], 2)
    assert torch.equal(got.cpu().double(), ref)
    if not rotate:
        assert not idx.rotations.any()


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_rotates_by_quarter_turns(device):
    # Asymmetric images: each rotation is a different tensor.
    images = torch.rand(10, 20, 1, 8, 8)
    s = TaskSampler(images, 5, 2, 3, rotate=True, device=device, seed=3)
    idx = s.draw(64)
    k = idx.rotations.cpu()
    assert set(k.unique().tolist()) == {0, 1, 2, 3}
    x_s = s.build(idx)[0].cpu().view(64, 5, 2, 1, 8, 8)
    for t, j in [(t, j) for t in range(64) for j in range(5)][:40]:
        img = images[idx.classes[t, j].item(), idx.drawings[t, j, 0].item()]
        matches = [r for r in range(4) if torch.equal(x_s[t, j, 0], torch.rot90(img, r, dims=(-2, -1)))]
        assert matches == [int(k[t, j])]


@needs_omniglot
def test_omniglot_samplers_and_rotation_on_real_data():
    train, test = omniglot_samplers(20, 5, 15, root=OMNIGLOT_DIR, seed=11)
    assert train.num_classes == 1200 and test.num_classes == 423 and train.rotate
    x_s, y_s, x_q, y_q = train.sample(4)
    assert x_s.shape == (4, 100, 1, 28, 28) and x_q.shape == (4, 300, 1, 28, 28)
    idx = train.draw(8)
    x = train.build(idx)[0].view(8, 20, 5, 1, 28, 28)
    plain = train.images[idx.classes[:, :, None], idx.drawings[:, :, :5]]
    turned = idx.rotations != 0
    assert turned.any()
    # Rotated classes differ from the stored drawing, unrotated ones equal it.
    assert torch.equal(x[~turned], plain[~turned])
    assert not torch.equal(x[turned], plain[turned])
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"shot \+ query = 6 \+ 15 = 21 exceeds the 20 drawings"):
        omniglot_samplers(5, 6, 15, root=OMNIGLOT_DIR)


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_determinism_and_resume(device):
    images = torch.rand(25, 20, 1, 6, 6)
    a = TaskSampler(images, 5, 1, 4, rotate=True, device=device, seed=5)
    b = TaskSampler(images, 5, 1, 4, rotate=True, device=device, seed=5)
    c = TaskSampler(images, 5, 1, 4, rotate=True, device=device, seed=6)
    first = a.sample(3)
    assert all(torch.equal(u, v) for u, v in zip(first, b.sample(3)))
    assert not torch.equal(first[0], c.sample(3)[0])

    a.sample(7)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    expected = [a.sample(4), a.sample(2)]
    buf.seek(0)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert c.tasks_drawn == 10 and c.seed == 5
    for want in expected:
        got = c.sample(len(want[0]))
        assert all(torch.equal(u, v) for u, v in zip(want, got))

    other = TaskSampler(images, 5, 2, 4, rotate=True, device=device)
    with pytest.raises(ValueError, match="shot: saved 1 vs this sampler 2"):
        other.load_state_dict(a.state_dict())


@pytest.mark.parametrize("device", DEVICES)
def test_eval_tasks_fixed_and_independent(device):
    images = torch.rand(12, 20, 1, 5, 5)
    s = TaskSampler(images, 4, 2, 3, rotate=True, device=device, seed=1)
    fresh = TaskSampler(images, 4, 2, 3, rotate=True, device=device, seed=1)
    one = list(s.eval_tasks(150, seed=7))
    assert len(one) == 1 and one[0][0].shape[0] == 150
    batched = list(s.eval_tasks(150, 40, seed=7))
    assert [b[0].shape[0] for b in batched] == [40, 40, 40, 30]
    for i in range(4):
        assert torch.equal(torch.cat([b[i] for b in batched]), one[0][i])
    assert not torch.equal(next(s.eval_tasks(5, seed=8))[0], one[0][0][:5])
    # The training stream is untouched by evaluation.
    assert s.tasks_drawn == 0
    assert torch.equal(s.sample(2)[0], fresh.sample(2)[0])


def test_sampler_errors_and_uint8():
    with pytest.raises(ValueError, match=r"shot \+ query = 16 \+ 5 = 21 exceeds the 20 drawings"):
        TaskSampler(torch.rand(5, 20, 1, 4, 4), 5, 16, 5)
    with pytest.raises(ValueError, match="way=6 exceeds the 5 classes"):
        TaskSampler(torch.rand(5, 20, 1, 4, 4), 6, 1, 1)
    with pytest.raises(ValueError, match="square"):
        TaskSampler(torch.rand(5, 20, 1, 4, 3), 2, 1, 1, rotate=True)
    with pytest.raises(ValueError, match=r"\[C, N, ch, H, W\]"):
        TaskSampler(torch.rand(5, 20, 4, 4), 2, 1, 1)
    with pytest.raises(ValueError, match="T must be"):
        TaskSampler(torch.rand(5, 20, 1, 4, 4), 2, 1, 1).sample(0)
    with pytest.raises(ValueError, match="num_tasks"):
        TaskSampler(torch.rand(5, 20, 1, 4, 4), 2, 1, 1).eval_tasks(0)
    raw = torch.randint(0, 256, (6, 7, 3, 4, 4), dtype=torch.uint8)
    a = TaskSampler(raw, 3, 2, 2, seed=2).sample(5)
    b = TaskSampler(raw.float() / 255, 3, 2, 2, seed=2).sample(5)
    assert a[0].dtype == torch.float32 and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


# ============================================================================
# Omniglot conversion from release-style zips
# ============================================================================

# Unsorted on purpose: the converter must sort alphabets and characters.
SMALL_OMNIGLOT = {
    "background": {"Latin": [3, 1, 10], "Alphabet_of_the_Magi": [2], "Anglo-Saxon_Futhorc": [1, 2]},
    "evaluation": {"ULOG": [1, 2], "Angelic": [4]},
}


def make_release_zips(folder: Path, rng: np.random.Generator, *, drop: tuple | None = None) -> dict:
    """Write images_{background,evaluation}.zip in the upstream layout; return the truth.

    Truth: {split: [(name, id, uint8 [20, 105, 105])]} in sorted order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    next_id = 40
    for split, alphabets in SMALL_OMNIGLOT.items():
        members, rows = [], []
        for alphabet, chars in alphabets.items():
            for c in chars:
                name, cid = f"{alphabet}/character{c:02d}", next_id
                next_id += 3  # ids are not the row order upstream either
                ink = rng.random((20, 105, 105)) < rng.uniform(0.02, 0.2)
                rows.append((name, cid, np.where(ink, 0, 255).astype(np.uint8)))
                for d in range(20):
                    if drop == (name, d):
                        continue
                    buf = io.BytesIO()
                    Image.fromarray(~ink[d]).save(buf, format="PNG")  # mode "1": True = white
                    members.append((f"images_{split}/{name}/{cid:04d}_{d + 1:02d}.png", buf.getvalue()))
        order = rng.permutation(len(members))
        with zipfile.ZipFile(folder / f"images_{split}.zip", "w") as zf:
            zf.writestr(f"images_{split}/", b"")
            for i in order:
                zf.writestr(*members[i])
        truth[split] = sorted(rows)
    return truth


def check_converted(root: Path, truth: dict) -> None:
    meta = json.loads((root / "characters.json").read_text())
    assert list(meta) == ["background", "evaluation", "note"]
    for split, rows in truth.items():
        assert meta[split]["characters"] == [r[0] for r in rows]
        assert meta[split]["character_ids"] == [r[1] for r in rows]
        big = np.load(root / f"images_{split}_105.npz", allow_pickle=False)["images"]
        small = np.load(root / f"images_{split}_28.npz", allow_pickle=False)["images"]
        assert big.dtype == small.dtype == np.uint8
        assert big.shape == (len(rows), 20, 105, 105) and small.shape == (len(rows), 20, 28, 28)
        assert np.array_equal(big, np.stack([r[2] for r in rows]))
        for c in range(len(rows)):
            for d in (0, 7, 19):
                want = np.asarray(Image.fromarray(big[c, d]).resize((28, 28), Image.LANCZOS))
                assert np.array_equal(small[c, d], want)
        assert len(np.unique(small)) > 2  # anti-aliased, not nearest-neighbour
    assert sorted(p.name for p in root.iterdir()) == sorted(OMNIGLOT_FILES)  # no temp files left


def test_convert_omniglot_zips(tmp_path):
    rng = np.random.default_rng()
    truth = make_release_zips(tmp_path / "zips", rng)
    zips = {s: tmp_path / "zips" / f"images_{s}.zip" for s in ("background", "evaluation")}
    out = tmp_path / "out"
    convert_omniglot_zips(zips, out, expected_counts={"background": 6, "evaluation": 3}, progress=False)
    check_converted(out, truth)
    first = [n for n, _, _ in truth["background"]][:2]
    assert first == ["Alphabet_of_the_Magi/character02", "Anglo-Saxon_Futhorc/character01"]

    with pytest.raises(ValueError, match=r"found 6 characters x 20 drawings, expected 964 x 20"):
        convert_omniglot_zips(zips, tmp_path / "x", progress=False)


def test_convert_omniglot_rejects_bad_zips(tmp_path):
    rng = np.random.default_rng()
    make_release_zips(tmp_path / "zips", rng, drop=("Latin/character10", 12))
    zips = {s: tmp_path / "zips" / f"images_{s}.zip" for s in ("background", "evaluation")}
    with pytest.raises(ValueError, match=r"Latin/character10 has drawings \[01, .*\], expected exactly 01\.\.20"):
        convert_omniglot_zips(zips, tmp_path / "x", expected_counts=None, progress=False)
    zips["background"].write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable zip"):
        convert_omniglot_zips(zips, tmp_path / "x", expected_counts=None, progress=False)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_prepare_omniglot_from_folder_and_url(tmp_path):
    truth = make_release_zips(tmp_path / "zips", np.random.default_rng())
    root = prepare_omniglot(tmp_path / "a", src=tmp_path / "zips", expected_counts=None, progress=False)
    check_converted(root, truth)
    # file:// exercises the download path (progress bar, atomic rename) offline.
    url = (tmp_path / "zips").as_uri()
    root = prepare_omniglot(tmp_path / "b", src=url, expected_counts=None, keep_zips=True, progress=False)
    assert (root / "images_background.zip").is_file()
    (root / "images_background.zip").unlink()
    (root / "images_evaluation.zip").unlink()
    check_converted(root, truth)
    with pytest.raises(FileNotFoundError, match="images_background.zip"):
        prepare_omniglot(tmp_path / "c", src=tmp_path, expected_counts=None, progress=False)
    with pytest.raises(OSError, match="could not download"):
        prepare_omniglot(tmp_path / "d", src=(tmp_path / "missing").as_uri(), expected_counts=None, progress=False)


# ============================================================================
# MiniImagenet
# ============================================================================

WNIDS = {
    "train": ["n01532829", "n01749939", "n01558993", "n01704323", "n01770081"],
    "val": ["n01855672", "n02091244", "n02114548", "n02138441", "n02174001"],
    "test": ["n01930112", "n01981276", "n02099601", "n02110063", "n02110341"],
}


def make_mini_csv(src: Path, rng: np.random.Generator, per_class: int = 6) -> dict:
    """CSV + images/ layout; returns {split: uint8 [C, n, 84, 84, 3]} (classes sorted)."""
    (src / "images").mkdir(parents=True)
    truth = {}
    for split, wnids in WNIDS.items():
        lines, per = ["filename,label"], {}
        for c, wnid in enumerate(wnids):  # unsorted: the converter sorts
            folder = src / "images" / (wnid if c == 1 else "")
            folder.mkdir(exist_ok=True)
            imgs = []
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                lines.append(f"{name},{wnid}")
                if i == 1:  # a real JPEG: compare with what Pillow decodes
                    Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(folder / name, "JPEG")
                    imgs.append(np.asarray(Image.open(folder / name).convert("RGB")))
                elif i == 2:  # not 84x84: resized with LANCZOS
                    im = Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8))
                    im.save(folder / name, "PNG")
                    imgs.append(np.asarray(im.resize((84, 84), Image.LANCZOS)))
                else:  # lossless under a .jpg name, as some mirrors ship
                    arr = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
                    Image.fromarray(arr).save(folder / name, "PNG")
                    imgs.append(arr)
            per[wnid] = np.stack(imgs)
        (src / f"{split}.csv").write_text("\n".join(lines) + "\n")
        truth[split] = np.stack([per[k] for k in sorted(per)])
    return truth


def make_mini_pickles(src: Path, rng: np.random.Generator, per_class: int = 6, protocol: int = 4) -> dict:
    src.mkdir(parents=True)
    truth = {}
    for split, wnids in WNIDS.items():
        n = len(wnids) * per_class
        data = rng.integers(0, 256, (n, 84, 84, 3), dtype=np.uint8)
        perm = rng.permutation(n)
        class_dict = {w: perm[i * per_class : (i + 1) * per_class].tolist() for i, w in enumerate(wnids)}
        with open(src / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=protocol)
        truth[split] = np.stack([data[class_dict[w]] for w in sorted(wnids)])
    return truth


def check_mini(root: Path, truth: dict) -> None:
    meta = json.loads((root / "miniimagenet_classes.json").read_text())
    for split, arr in truth.items():
        assert meta[split] == sorted(WNIDS[split])
        got = np.load(root / f"miniimagenet_{split}.npz", allow_pickle=False)["images"]
        assert got.dtype == np.uint8 and got.shape == arr.shape and np.array_equal(got, arr)
    x = truth["train"].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(meta["mean"], x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(meta["std"], x.std(0), rtol=1e-8)


@pytest.mark.parametrize("layout", ["csv", "pickle-4", "pickle-2"])
def test_miniimagenet_convert_load_sample(tmp_path, layout):
    rng = np.random.default_rng()
    src = tmp_path / "src"
    if layout == "csv":
        truth = make_mini_csv(src, rng)
    else:
        truth = make_mini_pickles(src, rng, protocol=int(layout[-1]))
    assert detect_miniimagenet_layout(src) == layout.split("-")[0]
    root = convert_miniimagenet(src, tmp_path / "out", expected_classes=None, per_class=6, progress=False)
    check_mini(root, truth)
    assert json.loads((root / "miniimagenet_classes.json").read_text())["source_layout"] == layout.split("-")[0]

    data = load_miniimagenet(root)
    for split, arr in truth.items():
        assert data[split].shape == (5, 6, 3, 84, 84) and data[split].dtype == torch.float32
        want = torch.from_numpy(arr).permute(0, 1, 4, 2, 3).double() / 255
        torch.testing.assert_close(data[split].double(), want, rtol=0, atol=1e-7)
        assert data[f"{split}_classes"] == sorted(WNIDS[split])
    normed = load_miniimagenet(root, splits=("train",), normalize=True)["train"]
    flat = normed.double().permute(2, 0, 1, 3, 4).reshape(3, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)

    raw = load_miniimagenet(root, splits=("test",), dtype=torch.uint8)
    assert raw["test"].dtype == torch.uint8 and "train" not in raw
    samplers = miniimagenet_samplers(5, 1, 3, root=root, splits=("train", "test"), seed=4)
    x_s, y_s, x_q, y_q = samplers["train"].sample(2)
    assert x_s.shape == (2, 5, 3, 84, 84) and x_q.shape == (2, 15, 3, 84, 84)
    u8 = miniimagenet_samplers(5, 1, 3, root=root, splits=("test",), dtype=torch.uint8, seed=4)["test"]
    assert torch.equal(u8.sample(2)[0], samplers["test"].sample(2)[0])


def test_miniimagenet_errors(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    src = tmp_path / "src"
    make_mini_pickles(src, rng)
    with pytest.raises(ValueError, match=r"found 5 train classes, expected 64"):
        convert_miniimagenet(src, tmp_path / "o1", per_class=None, progress=False)
    with pytest.raises(ValueError, match=r"6 images each, expected 600"):
        convert_miniimagenet(src, tmp_path / "o1", expected_classes=None, progress=False)

    # Unequal counts per class.
    with open(src / "mini-imagenet-cache-val.pkl", "rb") as f:
        val = pickle.load(f)
    val["class_dict"][WNIDS["val"][2]].pop()
    with open(src / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump(val, f)
    with pytest.raises(ValueError, match=r"unequal image counts \[5, 6\]"):
        convert_miniimagenet(src, tmp_path / "o2", expected_classes=None, per_class=None, progress=False)

    # A class in two splits.
    val["class_dict"][WNIDS["val"][2]].append(0)
    val["class_dict"][WNIDS["train"][0]] = val["class_dict"].pop(WNIDS["val"][0])
    with open(src / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump(val, f)
    with pytest.raises(ValueError, match=r"class n01532829 is in both the train and the val split"):
        convert_miniimagenet(src, tmp_path / "o3", expected_classes=None, per_class=None, progress=False)

    # Pickles that would run code are refused.
    with open(src / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": os.getcwd, "class_dict": {}}, f)
    with pytest.raises(ValueError, match=r"refusing to load posix\.getcwd|refusing to load nt\.getcwd"):
        convert_miniimagenet(src, tmp_path / "o4", expected_classes=None, per_class=None, progress=False)

    with pytest.raises(FileNotFoundError, match="neither MiniImagenet layout"):
        detect_miniimagenet_layout(tmp_path)

    monkeypatch.setenv("IMAML_DATA_MINIIMAGENET", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        load_miniimagenet()
    assert "IMAML_DATA_MINIIMAGENET" in str(err.value)
    assert "imaml-data miniimagenet --src SRC --root" in str(err.value)


def test_miniimagenet_corrupt_npz(tmp_path):
    src = tmp_path / "src"
    make_mini_pickles(src, np.random.default_rng(), per_class=4)
    root = convert_miniimagenet(src, tmp_path / "out", expected_classes=None, per_class=None, progress=False)
    path = root / "miniimagenet_val.npz"
    path.write_bytes(path.read_bytes()[:1000])
    load_miniimagenet(root, splits=("train",))
    with pytest.raises(ValueError, match=r"miniimagenet_val\.npz: cannot be read"):
        load_miniimagenet(root)
    np.savez(path, images=np.zeros((5, 4, 84, 84, 1), np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 \[5, n, 84, 84, 3\], found uint8 \[5, 4, 84, 84, 1\]"):
        load_miniimagenet(root)


# ============================================================================
# CLI
# ============================================================================


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "imaml_kernels.data", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_omniglot(tmp_path, capsys):
    truth = make_release_zips(tmp_path / "zips", np.random.default_rng())
    r = run_cli("omniglot", "--root", str(tmp_path / "out"), "--src", str(tmp_path / "zips"),
                "--no-count-check", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "Omniglot ready" in r.stdout
    check_converted(tmp_path / "out", truth)
    # Error paths in-process: each subprocess pays the package import (seconds).
    zips = str(tmp_path / "zips")
    code = cli_main(["omniglot", "--root", str(tmp_path / "strict"), "--src", zips, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "expected 964 x 20" in err
    code = cli_main(["omniglot", "--root", str(tmp_path / "small"), "--src", str(tmp_path / "zips"),
                     "--expected-counts", "6,3", "--no-progress"])
    assert code == 0
    check_converted(tmp_path / "small", truth)


def test_cli_miniimagenet(tmp_path, capsys):
    truth = make_mini_csv(tmp_path / "src", np.random.default_rng(), per_class=3)
    r = run_cli("miniimagenet", "--src", str(tmp_path / "src"), "--root", str(tmp_path / "out"),
                "--no-count-check", "--no-progress")
    assert r.returncode == 0, r.stderr
    check_mini(tmp_path / "out", truth)
    code = cli_main(["miniimagenet", "--src", str(tmp_path / "nothing"), "--root", str(tmp_path / "o2")])
    assert code == 1 and "neither MiniImagenet layout" in capsys.readouterr().err
    src = str(tmp_path / "src")
    code = cli_main(["miniimagenet", "--src", src, "--root", str(tmp_path / "o3"), "--no-progress"])
    assert code == 1 and "3 images each, expected 600" in capsys.readouterr().err
    code = cli_main(["miniimagenet", "--src", str(tmp_path / "src"), "--root", str(tmp_path / "o3"),
                     "--per-class", "3", "--no-progress"])
    assert code == 1 and "found 5 train classes, expected 64" in capsys.readouterr().err
