"""Checkpoint files: atomic, verified by their SHA-256, and a clear error for every bad file."""

import errno
import os

import pytest
import torch

from fgattn.train import checkpoint as ck

PATTERN = torch.arange(4096, dtype=torch.int32) * 7919  # easy to find in the file's bytes


def state():
    return {
        "model": {"weight": torch.randn(8, 4), "marker": PATTERN.clone()},
        "epoch": 3,
        "rng": {"python": (3, tuple(range(5)), None)},
        "config": {"lr": 0.01, "name": "run"},
    }


def test_round_trip_stores_and_checks_a_digest(tmp_path):
    path = tmp_path / "last.pth"
    saved = state()
    ck.save_atomic(saved, path)
    raw = torch.load(path, weights_only=True)
    assert raw[ck.DIGEST_KEY] == ck.content_digest(saved)
    loaded = ck.load_checkpoint(path)
    assert ck.DIGEST_KEY not in loaded and loaded["epoch"] == 3
    torch.testing.assert_close(loaded["model"]["weight"], saved["model"]["weight"])
    ck.save_atomic(loaded, path)  # a loaded checkpoint saves again with a fresh digest
    ck.load_checkpoint(path)
    ck.save_atomic({**saved, ck.DIGEST_KEY: "stale"}, path)  # a stale digest is replaced
    assert ck.load_checkpoint(path)["epoch"] == 3


def test_flipped_bytes_in_the_weights_are_an_error(tmp_path):
    path = tmp_path / "last.pth"
    ck.save_atomic(state(), path)
    data = bytearray(path.read_bytes())
    at = data.index(PATTERN.numpy().tobytes()) + 100
    data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted: its content does not match the SHA-256"):
        ck.load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"epoch: 3\nlr: 0.1\n", r"is not a PyTorch checkpoint .*starts with b'epoc'"),
    ],
)
def test_empty_and_foreign_files(tmp_path, content, match):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        ck.load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "last.pth"
    ck.save_atomic(state(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*truncated, corrupted"):
        ck.load_checkpoint(path)


class Arbitrary:
    pass


def test_pickled_objects_are_refused_without_advice_to_unpickle(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Arbitrary()}, path)
    with pytest.raises(ValueError, match="holds Python objects") as info:
        ck.load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)


def test_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an fgattn training checkpoint"):
        ck.load_checkpoint(path)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ck.save_atomic(state(), path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"disk full while writing {path}"):
        ck.save_atomic(state(), path)
    assert path.read_bytes() == before
    assert list(tmp_path.glob(".*.tmp")) == []


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".last.pth.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.pth").write_bytes(b"keep")
    removed = ck.remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".last.pth.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
