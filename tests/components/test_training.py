"""components.training: checkpoint fingerprints, code digests."""

import types

import pytest

from components.errors import StageError
from components.training import code_digest, fingerprint, per_process_batch, prepare_checkpoints, process_grid


def test_checkpoints_of_another_fingerprint_are_wiped_and_the_same_one_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert prepare_checkpoints(ckpt, "a") is None
    (ckpt / "last.ckpt").write_bytes(b"state")
    assert prepare_checkpoints(ckpt, "a") == ckpt / "last.ckpt"  # same run: resume
    assert prepare_checkpoints(ckpt, "b") is None and not (ckpt / "last.ckpt").exists()  # another: afresh


def test_changed_training_code_changes_the_fingerprint(tmp_path):
    source = tmp_path / "train_code.py"
    module = types.SimpleNamespace(__file__=str(source))
    source.write_text("LOSS = 'l2'\n")
    before = fingerprint(spec={"w": 1}, code=code_digest(module))
    assert fingerprint(spec={"w": 1}, code=code_digest(module)) == before
    source.write_text("LOSS = 'l1'\n")
    assert fingerprint(spec={"w": 1}, code=code_digest(module)) != before


def test_non_zero_ranks_only_read_the_checkpoint_folder(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    prepare_checkpoints(ckpt, "a")
    (ckpt / "last.ckpt").write_bytes(b"state")
    monkeypatch.setenv("RANK", "1")
    assert prepare_checkpoints(ckpt, "a") == ckpt / "last.ckpt"
    assert prepare_checkpoints(ckpt, "b") is None and (ckpt / "last.ckpt").exists()  # rank 0 decides to wipe


def test_the_process_grid_comes_from_torchrun_when_it_launched_us(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert process_grid(8) == (8, 1)  # params: one node, train.devices
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert process_grid(8) == (8, 4)  # a 4-node TrainJob
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")
    with pytest.raises(StageError, match="not a multiple"):
        process_grid(8)


def test_the_batch_size_is_global_and_split_evenly_over_processes():
    assert per_process_batch("base", 512, 1) == 512
    assert per_process_batch("base", 512, 32) == 16
    with pytest.raises(StageError, match="base.train.batch_size 512 is the global batch.*over 24 processes"):
        per_process_batch("base", 512, 24)
