"""Run folders are never mixed, never replaced silently, never written by two runs at once."""

import pytest

from fgattn.train import rundir


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
    rundir.claim(run, resume=True).release()
    assert (run / "last.pth").exists()  # resuming keeps it
    rundir.claim(run, overwrite=True).release()
    assert not (run / "last.pth").exists() and not (run / "config.yaml").exists()


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
        rundir.claim(run, resume=True)
    first.release()
    rundir.claim(run, resume=True).release()


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pth.k3j4.tmp").write_bytes(b"half a checkpoint")
    rundir.claim(run).release()
    assert not list(run.glob(".*.tmp"))
