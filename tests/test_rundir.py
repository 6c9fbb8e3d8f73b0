"""Run folders are never mixed, never replaced silently, never written by two runs at once."""

import pytest
import torch

from fgattn.train import rundir


def _checkpoint(path, run_id, epoch=1, step=0, name="run"):
    """A checkpoint file of run ``run_id`` at ``path``; returns its identity."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"run_id": run_id, "config": {"name": name}, "epoch": epoch, "step": step}
    torch.save({**ckpt, "model": {"w": torch.ones(1)}}, path)
    return rundir.RunIdentity.of(ckpt, path)


def test_fresh_folder_is_claimed_and_released(tmp_path):
    run = tmp_path / "run"
    with rundir.claim(run) as lock:
        assert run.is_dir() and lock.path.exists()
    rundir.claim(run).release()  # released: claimable again


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"earlier run")
    (run / "config.yaml").write_text("lr: 0.1\n")
    with pytest.raises(
        rundir.RunFolderError, match=r"already holds a run \(config.yaml, last.pth\)"
    ):
        rundir.claim(run)
    assert (run / "last.pth").read_bytes() == b"earlier run"  # nothing touched
    own = rundir.RunIdentity(run / "last.pth", None, "run", 1, 0)
    rundir.claim(run, resume=own).release()
    assert (run / "last.pth").exists()  # resuming keeps it
    lock = rundir.claim(run, overwrite=True)
    assert lock.replaced == ["config.yaml", "last.pth"]
    assert not (run / "last.pth").exists() and not (run / "config.yaml").exists()
    assert lock.commit() == ["config.yaml", "last.pth"]  # the new run has its first checkpoint
    lock.release()
    assert not (run / rundir.PREVIOUS).exists()


def test_a_failed_start_does_not_block_the_next_attempt(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data_root: /wrong\n")  # died before its first epoch
    rundir.claim(run).release()


def test_other_files_of_the_user_are_never_deleted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "best.pth").write_bytes(b"x")
    rundir.claim(run, overwrite=True).release()
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(rundir.fcntl is None, reason="no advisory file locks on this platform")
def test_two_runs_cannot_write_one_folder(tmp_path):
    run = tmp_path / "run"
    first = rundir.claim(run)
    with pytest.raises(rundir.RunFolderError, match=r"is in use by another run \(pid \d+ on"):
        rundir.claim(run)
    first.release()
    rundir.claim(run).release()


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pth.k3j4.tmp").write_bytes(b"half a checkpoint")
    rundir.claim(run).release()
    assert not list(run.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Whose folder it is: a resumed run writes only into its own run's folder


def test_resuming_another_runs_checkpoint_into_a_folder_is_an_error(tmp_path):
    other = _checkpoint(tmp_path / "a" / "last.pth", "aaaa", epoch=3, name="a")
    _checkpoint(tmp_path / "b" / "last.pth", "bbbb", epoch=5, name="b")
    before = (tmp_path / "b" / "last.pth").read_bytes()
    with pytest.raises(rundir.RunFolderError, match=r"belongs to run 'b' \(id bbbb, at epoch 5\)"):
        rundir.claim(tmp_path / "b", resume=other)
    assert (tmp_path / "b" / "last.pth").read_bytes() == before
    # a copy of run a's checkpoint inside b's folder is still run a's
    copy = tmp_path / "b" / "copied.pth"
    copy.write_bytes((tmp_path / "a" / "last.pth").read_bytes())
    with pytest.raises(rundir.RunFolderError, match=r"checkpoint of run 'a' \(id aaaa"):
        rundir.claim(tmp_path / "b", resume=rundir.read_identity(copy))
    rundir.claim(tmp_path / "new", resume=other).release()  # a new folder: a branch of run a
    lock = rundir.claim(tmp_path / "b", resume=other, overwrite=True)  # replacing b, as asked
    assert lock.replaced == ["last.pth"]
    lock.restore()
    lock.release()
    assert (tmp_path / "b" / "last.pth").read_bytes() == before


def test_resuming_an_earlier_state_of_the_run_is_refused(tmp_path):
    _checkpoint(tmp_path / "r" / "last.pth", "rrrr", epoch=5)
    backup = _checkpoint(tmp_path / "backup" / "epoch2.pth", "rrrr", epoch=2)
    with pytest.raises(rundir.RunFolderError, match=r"later state of this run .* epoch 5"):
        rundir.claim(tmp_path / "r", resume=backup)
    later = _checkpoint(tmp_path / "backup" / "epoch7.pth", "rrrr", epoch=7)
    rundir.claim(tmp_path / "r", resume=later).release()  # the same run, further on


def test_overwrite_keeps_the_old_run_until_restore_or_commit(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "last.pth", "old")
    (run / "summary.csv").write_text("epoch\n1\n")
    lock = rundir.claim(run, overwrite=True)
    assert sorted(p.name for p in (run / rundir.PREVIOUS).iterdir()) == ["last.pth", "summary.csv"]
    (run / "config.yaml").write_text("new: run\n")  # the new run starts, then fails
    assert lock.restore() == ["summary.csv", "last.pth"]
    lock.release()
    assert (run / "summary.csv").read_text() == "epoch\n1\n" and (run / "last.pth").exists()
    assert not (run / "config.yaml").exists() and not (run / rundir.PREVIOUS).exists()


def test_a_replacing_run_killed_before_its_first_checkpoint_gives_the_old_run_back(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "last.pth", "old")
    lock = rundir.claim(run, overwrite=True)
    (run / "config.yaml").write_text("new: run\n")
    lock.release()  # killed: no restore
    with pytest.raises(rundir.RunFolderError, match="already holds a run"):
        rundir.claim(run)  # the old run is back in place, and protected again
    assert rundir.read_identity(run / "last.pth").run_id == "old"
