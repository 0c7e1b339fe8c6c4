"""components.training: checkpoint fingerprints, code digests."""

import types

from components.training import code_digest, fingerprint, prepare_checkpoints


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
