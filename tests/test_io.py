"""The one atomic writer: a file or folder appears whole or not at all, and nothing is left behind."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ace_diffusers._io import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    staged_directory,
)


def test_files_are_replaced_whole_and_leave_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    atomic_write_text(tmp_path / "a.txt", "héllo")
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert path.read_bytes() == b"second"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "a.txt", "out.bin", "sub"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_debris(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not JSON: fails before the rename
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_safetensors_round_trip_moves_tensors_to_the_cpu_contiguous(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3).T, "b": torch.ones(2, dtype=torch.float16)}
    atomic_save_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(back["a"], tensors["a"]) and back["b"].dtype == torch.float16


def test_staged_directory_replaces_the_folder_and_carries_chosen_files(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "README.md").write_text("card")
    (target / "old.bin").write_text("old")
    with staged_directory(target, carry_over=lambda item: item.name == "README.md") as staging:
        (staging / "new.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or backup left


def test_staged_directory_leaves_the_target_untouched_on_error(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "kept.bin").write_text("kept")
    with pytest.raises(RuntimeError, match="boom"), staged_directory(target) as staging:
        (staging / "half.bin").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["kept.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_killed_saves_staging_folder_is_swept_by_the_next_save(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "adapter"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".adapter.saving-{int(dead.stdout)}-abc"  # that process has exited
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x" * 100)
    with staged_directory(target) as staging:
        (staging / "new.bin").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_saved_folders_follow_the_umask_and_links_are_written_through(tmp_path):
    import os

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    old = os.umask(0o022)
    try:
        with staged_directory(link) as staging:
            (staging / "a.bin").write_text("a")
    finally:
        os.umask(old)
    assert link.is_symlink() and (link / "a.bin").read_text() == "a" and (real / "a.bin").is_file()
    assert oct(real.stat().st_mode & 0o777) == oct(0o755)
