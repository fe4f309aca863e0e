"""mtp_lightning.atomic: a failed write keeps the old file and leaves no temporary; a full disk is one
DiskFull line; a cache entry whose files differ from its manifest is rebuilt with a note.

The full disk here is real: the temporary is opened on /dev/full, whose every write fails with ENOSPC
from the kernel (tests/test_faults.py fills a real tmpfs during a fit).
"""

import builtins
import json

import numpy as np
import pytest
import torch

from mtp_lightning import atomic
from mtp_lightning.errors import UserError


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def full_disk(monkeypatch):
    """Every file the writer opens for writing is /dev/full (writes fail with ENOSPC, for real)."""
    real_open = builtins.open
    monkeypatch.setattr(atomic, "open", lambda path, mode="r", *a, **k: real_open(
        "/dev/full" if "w" in mode else path, mode, *a, **k), raising=False)


def test_write_replaces_the_file_and_leaves_only_it(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic.write_text(target, "one")
    atomic.write_text(target, "two")
    assert target.read_text() == "two" and names(target.parent) == ["a.txt"]


@pytest.mark.parametrize("writer", ["bytes", "torch.save", "np.save"])
def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, full_disk, writer):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    with pytest.raises(atomic.DiskFull) as e:
        if writer == "bytes":
            atomic.write_bytes(target, b"new" * 10_000, what="checkpoint", fix="the old one is intact")
        else:
            with atomic.writing(target, what="checkpoint", fix="the old one is intact") as f:
                # torch.save turns the failed write into a RuntimeError ("unexpected pos"): the errno
                # comes from the file object's own record
                torch.save({"w": torch.zeros(10_000)}, f) if writer == "torch.save" else np.save(f, np.zeros(10_000))
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message
    assert message.startswith(f"disk full while writing checkpoint '{target}': no space left on the filesystem "
                              f"mounted at '")
    assert message.endswith("; the old one is intact")
    assert target.read_bytes() == b"old" and names(tmp_path) == ["last.ckpt"]


def test_any_other_failure_is_re_raised_and_cleaned_up(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with atomic.writing(target) as f:
            f.write(b"half")
            1 / 0
    assert target.read_bytes() == b"old" and names(tmp_path) == ["a.bin"]


def test_writing_path_for_a_writer_that_takes_a_path(tmp_path):
    target = tmp_path / "lib.so"
    with atomic.writing_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".lib.so.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"built")
    assert target.read_bytes() == b"built"
    with pytest.raises(RuntimeError, match="compiler failed"):
        with atomic.writing_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("compiler failed")
    assert target.read_bytes() == b"built" and names(tmp_path) == ["lib.so"]


def test_temporaries_are_unique_per_call(tmp_path):
    seen = set()
    for _ in range(20):
        with atomic.writing_path(tmp_path / "x") as tmp:
            seen.add(tmp.name)
            tmp.write_bytes(b"")
    assert len(seen) == 20


def _entry(tmp_path, calls):
    def build():
        calls.append(1)
        (tmp_path / "a.npy").write_bytes(b"A" * 100)
        (tmp_path / "b.npy").write_bytes(b"B" * 50)
        return [tmp_path / "a.npy", tmp_path / "b.npy"], {"tokens": 150}
    return atomic.cached_entry(tmp_path / "meta.json", build, f"the test cache '{tmp_path}'")


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "a.npy").write_bytes(b"A" * 60), "a.npy holds 60 bytes, its manifest says 100"),
    (lambda d: (d / "b.npy").write_bytes(b"b" * 50), "the content of b.npy differs from its checksum"),
    (lambda d: (d / "b.npy").unlink(), "b.npy is missing"),
    (lambda d: (d / "meta.json").write_text("{not json"), "its manifest 'meta.json' is unreadable"),
])
def test_a_damaged_entry_is_rebuilt_with_a_note(tmp_path, capsys, damage, reason):
    calls = []
    assert _entry(tmp_path, calls) == {"tokens": 150} and len(calls) == 1
    assert _entry(tmp_path, calls) == {"tokens": 150} and len(calls) == 1  # verified, not rebuilt
    assert capsys.readouterr().err == ""
    damage(tmp_path)
    assert _entry(tmp_path, calls) == {"tokens": 150} and len(calls) == 2
    assert capsys.readouterr().err == f"note: the test cache '{tmp_path}' is damaged ({reason}); rebuilding it\n"
    assert (tmp_path / "a.npy").read_bytes() == b"A" * 100
    manifest = json.loads((tmp_path / "meta.json").read_text())
    assert manifest["files"]["a.npy"]["bytes"] == 100 and manifest["record"] == {"tokens": 150}
