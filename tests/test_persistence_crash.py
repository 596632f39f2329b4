"""save_pretrained as one commit: crashes at every step leave the old or the new checkpoint."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import (
    ENDS_UNTRAINED,
    assert_same_importance,
    classification_batches,
    dir_digest,
    same_state,
    saved_mlp,
    small_mlp,
    snapshot,
)
from softmask_format import atomic as _atomic
from softmask_format.atomic import COMMIT_MARKER, STAGING_PREFIX
from softmask_format.names import CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME

from softmask_peft import (
    SoftMaskModel,
)


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs, no cleanup handler catches it."""


@pytest.mark.parametrize("renames_before_crash", [0, 1, 2])  # three files
@ENDS_UNTRAINED
def test_crash_between_the_renames_is_rolled_forward_by_the_next_load(
    tmp_path, monkeypatch, renames_before_crash
):
    model, directory = saved_mlp(tmp_path)
    model.begin_task(2)
    model.end_task(classification_batches(in_features=6))
    with torch.no_grad():
        model.base_model.fc1.weight.add_(1.0)
    expected = snapshot(model.base_model)
    real_replace, moved = os.replace, []

    def crash_midway(src, dst):
        if Path(dst).parent == directory:  # a rename into place, after the commit point
            if len(moved) == renames_before_crash:
                raise Crash
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_midway)
    with pytest.raises(Crash):
        model.save_pretrained(directory)
    monkeypatch.undo()
    fresh = small_mlp(seed=3, in_features=6)
    loaded = SoftMaskModel.from_pretrained(fresh, directory)
    assert loaded.num_tasks == 3 and same_state(snapshot(fresh), expected)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME]
    )


@ENDS_UNTRAINED
def test_an_interrupt_right_after_the_commit_point_keeps_the_new_save(tmp_path, monkeypatch):
    model, directory = saved_mlp(tmp_path)
    model.begin_task(2)
    model.end_task(classification_batches(in_features=6))
    real_fsync = _atomic.fsync_directory

    def interrupted(path):
        if (Path(path) / COMMIT_MARKER).is_file():
            raise Crash
        real_fsync(path)

    monkeypatch.setattr(_atomic, "fsync_directory", interrupted)
    with pytest.raises(Crash):
        model.save_pretrained(directory)
    monkeypatch.undo()
    assert SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory).num_tasks == 3


@ENDS_UNTRAINED
def test_a_load_racing_the_renames_does_not_fail_the_save(tmp_path, monkeypatch):
    model, directory = saved_mlp(tmp_path)
    model.begin_task(2)
    model.end_task(classification_batches(in_features=6))
    real_replace, loads = os.replace, []

    def reader_cuts_in(src, dst):
        if Path(dst).parent == directory and not loads:
            loads.append(None)  # the reader's own renames go straight through
            loads[0] = SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", reader_cuts_in)
    model.save_pretrained(directory)
    monkeypatch.undo()
    assert loads[0].num_tasks == 3  # the reader finished the committed save itself
    assert SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory).num_tasks == 3


def test_a_killed_uncommitted_save_is_ignored_by_loads_and_cleared_by_the_next_save(tmp_path):
    model, directory = saved_mlp(tmp_path)
    leftover = directory / (STAGING_PREFIX + "killed")
    leftover.mkdir(mode=0o700)  # as tempfile.mkdtemp creates it
    (leftover / WEIGHTS_NAME).write_bytes(b"\x00" * 16)  # killed before its commit marker
    loaded = SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory)
    assert loaded.num_tasks == 2 and leftover.is_dir()
    model.save_pretrained(directory)
    assert not leftover.exists()




def test_a_planted_staging_link_is_never_followed(tmp_path):
    model, directory = saved_mlp(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / COMMIT_MARKER).write_text("")
    (outside / WEIGHTS_NAME).write_bytes(b"not weights")
    (directory / f"{STAGING_PREFIX}planted").symlink_to(outside, target_is_directory=True)
    before, outside_before = dir_digest(directory), dir_digest(outside)
    loaded = SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory)
    assert_same_importance(model, loaded)
    assert dir_digest(directory) == before and dir_digest(outside) == outside_before
    model.save_pretrained(directory)  # a save does not consume (or delete through) it either
    assert dir_digest(outside) == outside_before


def test_a_link_inside_a_committed_staging_folder_is_not_moved(tmp_path):
    _, directory = saved_mlp(tmp_path)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (staging / CONFIG_NAME).symlink_to(secret)
    (staging / COMMIT_MARKER).write_text("")
    SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory)
    assert not (directory / CONFIG_NAME).is_symlink() and secret.read_text() == "{}"
