"""dpface.io: the one durable writer (content, file mode, no temp file after a failure)."""
import json
import os
import stat

import pytest
import torch

from dpface import io as dio


def test_writes_content_and_replaces(tmp_path):
    p = tmp_path / "sub" / "f.bin"  # the parent is created
    dio.atomic_write_bytes(p, b"one")
    dio.atomic_write(p, lambda f: f.write(b"two"))
    assert p.read_bytes() == b"two"
    dio.atomic_write_json(tmp_path / "m.json", {"a": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2]}
    dio.atomic_write_text(tmp_path / "t.md", "héllo\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo\n"
    dio.atomic_save({"w": torch.arange(3)}, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], torch.arange(3))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m.json", "sub", "t.md", "x.pt"]
    assert [q.name for q in (tmp_path / "sub").iterdir()] == ["f.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_follows_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        dio.atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o666 & ~umask


def test_failing_writer_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.json"
    dio.atomic_write_text(p, "old")

    def boom(f):
        f.write(b"half a fi")
        raise KeyboardInterrupt  # BaseException too: a Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        dio.atomic_write(p, boom)
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["f.json"]
