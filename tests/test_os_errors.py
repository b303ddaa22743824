"""The operating system's refusals (disk full, read-only filesystem, permission denied) are one clear line
and exit 2 in `merge` and `run`, never "internal error", and leave no half-written output."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergebench.cli.main import cli

from test_cli_errors import assert_user_error, no_leftovers


def merge(models, out):
    return CliRunner().invoke(cli, ["merge", "average", "-e", str(models["e0"]), "-e", str(models["e1"]),
                                    "-o", str(out), "-q"])


def test_a_merge_that_cannot_fit_is_refused_before_writing(toy_models, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    written = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1024))
    import mergebench.core.writer as writer

    monkeypatch.setattr(writer.ShardWriter, "write", lambda *a, **k: written.append(a))
    result = merge(toy_models, tmp_path / "out")
    assert_user_error(result, "the merge needs", "GiB free", "free some space")
    assert written == []
    no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied")])
def test_an_os_error_while_writing_a_merge_is_one_line(toy_models, tmp_path, monkeypatch, code, words):
    import mergebench.core.writer as writer

    def fail(self, name, tensor):
        raise OSError(code, os.strerror(code), str(tmp_path / "out"))

    monkeypatch.setattr(writer.ShardWriter, "write", fail)
    result = merge(toy_models, tmp_path / "out")
    assert_user_error(result, os.strerror(code), words)
    assert "internal error" not in result.output
    no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_run_into_an_unwritable_run_directory_is_one_line(tmp_path, monkeypatch, code, words):
    run_dir = tmp_path / "ro" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    result = CliRunner().invoke(cli, ["run", "--run-dir", str(run_dir)])
    assert_user_error(result, str(run_dir), os.strerror(code), words)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_run_into_a_directory_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = CliRunner().invoke(cli, ["run", "--run-dir", str(locked / "run")])
    finally:
        locked.chmod(0o700)
    assert_user_error(result, "Permission denied")
