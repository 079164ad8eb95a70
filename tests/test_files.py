"""Atomic writes: content, permissions, the one temporary file, cleanup on failure; hashes and JSON."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import cpl_cert
from cpl_cert.errors import CplCertError
from cpl_cert.files import atomic_write, file_sha256, remove_stale_temporaries, temporary_pattern, write_json


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_mode(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "text")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" and (tmp_path / "b.txt").read_text() == "text"
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == mode


def test_overwrite_keeps_the_old_files_mode(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    target.chmod(0o640)
    write_json(target, {"a": 1})
    assert target.stat().st_mode & 0o777 == 0o640
    assert json.loads(target.read_text()) == {"a": 1}


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")

    def explode(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, explode)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_missing_folder_is_one_sentence(tmp_path):
    with pytest.raises(CplCertError, match="the folder .* does not exist"):
        atomic_write(tmp_path / "no" / "x.json", "{}")


def test_checkpoint_save_uses_only_its_own_temporary_file(tmp_path, tiny_model, monkeypatch, umask):
    """At the moment of the rename the folder holds the target's ``.<name>.*.tmp`` and nothing else."""
    umask(0o027)
    seen: list[list[str]] = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(tiny_model, path)
    assert len(seen) == 1 and len(seen[0]) == 1
    assert seen[0][0].startswith(".m.safetensors.") and seen[0][0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert path.stat().st_mode & 0o777 == 0o640


def test_file_sha256_matches_hashlib(tmp_path):
    payload = os.urandom(3 * (1 << 20) + 17)  # spans several read blocks
    (tmp_path / "f").write_bytes(payload)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(payload).hexdigest()


def test_stale_temporaries_are_only_atomic_writes_own(tmp_path):
    """Exactly the names ``atomic_write`` gives (``.<name>.<8 characters>.tmp``) are removed; a glob-special name is safe."""
    target = tmp_path / "m[1].safetensors"
    mine = [".m[1].safetensors.ab_cd123.tmp", ".m[1].safetensors.zzzzzzzz.tmp"]
    others = [".m[1].safetensors.short.tmp", ".m1.safetensors.abcdefgh.tmp", ".other.safetensors.abcdefgh.tmp", "m[1].safetensors"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(target)
    assert sorted(p.name for p in removed) == sorted(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_a_real_temporary_name_matches_the_cleanup_pattern(tmp_path, monkeypatch):
    """The pattern is checked against the name mkstemp really produced during a write."""
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    atomic_write(tmp_path / "report.json", "{}")
    assert len(seen) == 1 and temporary_pattern(tmp_path / "report.json").fullmatch(seen[0])
