import os
import random

import numpy as np
import pytest
import torch

from nanorlhf import checkpoint as ck
from nanorlhf.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint


def draw():
    return torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist(), np.random.randn()


def sample_ckpt():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return make_checkpoint(model, {"n_layer": 2}, "lm", "tiny", {"lr": 3e-4, "out": "runs/x"}, step=7,
                           optimizer=opt, extra={"metrics": {"loss": [1.5, 1.25]}, "buf": torch.arange(5)})


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_and_rng(tmp_path):
    ck.seed_everything(0)
    np.random.randn()  # leave numpy with a cached gaussian, part of its state
    ckpt = sample_ckpt()
    expected = draw()
    path = str(tmp_path / "sub" / "dir" / "ckpt.pt")
    save_checkpoint(path, ckpt)
    assert os.listdir(tmp_path / "sub" / "dir") == ["ckpt.pt"]
    loaded = load_checkpoint(path)
    assert_same(ckpt, loaded)
    assert loaded["format"] == 1 and loaded["step"] == 7 and loaded["head"] == "lm" and loaded["tokenizer"] == "tiny"
    ck.set_rng_state(loaded["rng"])
    assert draw() == expected


def test_seed_everything_is_deterministic():
    ck.seed_everything(5)
    a = draw()
    ck.seed_everything(5)
    assert draw() == a
    ck.seed_everything(6)
    assert draw() != a


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="nope.pt: no such"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, sample_ckpt())
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt.pt: truncated") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_corrupt_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, sample_ckpt())
    data = bytearray(open(path, "rb").read())
    data[100:200] = bytes(range(100, 200))  # damage the archive's first entry, keep its directory
    open(path, "wb").write(data)
    with pytest.raises(CheckpointError, match="ckpt.pt: corrupt") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind, why", [("tensor", "not a nanorlhf"), ("dict", "not a nanorlhf"), ("bytes", "corrupt"),
                                       ("empty", "corrupt"), ("pickle", "not a nanorlhf")])
def test_foreign_file(tmp_path, kind, why):
    path = str(tmp_path / f"foreign_{kind}.pt")
    if kind == "tensor":
        torch.save(torch.ones(3), path)
    elif kind == "dict":
        torch.save({"model": {}, "step": 1}, path)
    elif kind == "pickle":
        torch.save({"format": 1, "obj": random.Random(0)}, path)  # arbitrary objects: refused by weights_only
    else:
        with open(path, "wb") as f:
            f.write(os.urandom(1000) if kind == "bytes" else b"")
    with pytest.raises(CheckpointError, match=f"foreign_{kind}.pt: .*{why}") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_wrong_format_version(tmp_path):
    path = str(tmp_path / "v2.pt")
    torch.save({"format": 2}, path)
    with pytest.raises(CheckpointError, match="format 2"):
        load_checkpoint(path)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"step": 1, "w": torch.ones(2)})
    before = open(path, "rb").read()
    real_save = torch.save

    def crash_midway(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)  # half written, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(2)})
    assert open(path, "rb").read() == before
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no stray .tmp

    new = str(tmp_path / "fresh.pt")
    with pytest.raises(OSError):
        save_checkpoint(new, {"step": 3})
    assert not os.path.exists(new)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_restored_after_cuda_map_location(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"rng": ck.rng_state()})
    expected = draw(), torch.rand(2, device="cuda").tolist()
    ck.set_rng_state(load_checkpoint(path, map_location="cuda")["rng"])  # RNG tensors now live on the GPU
    assert (draw(), torch.rand(2, device="cuda").tolist()) == expected


def test_save_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Durable, not only atomic: the data reaches the disk before the rename publishes it, and the rename itself is
    synced by an fsync of the folder."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"step": 1})
    assert events == [("fsync", False), ("replace", "ckpt.pt"), ("fsync", True)]
