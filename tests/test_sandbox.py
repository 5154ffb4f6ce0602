"""Tests for sandbox/: real files under tmp_path, no mocks.

Layout used throughout: ``tmp_path/run`` is the sandbox root and
``tmp_path/outside`` is a sibling directory that must never change.
"""

from __future__ import annotations

import array
import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

# The project is not pip-installed in the venv and pytest is run as `.venv/bin/pytest`
# (no cwd on sys.path), so make the repo root importable. Harmless once installed.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from sandbox import (  # noqa: E402
    DiskFullError,
    EscapeError,
    PartialFile,
    PermissionDeniedError,
    QuotaExceeded,
    Sandbox,
    SandboxError,
)
from sandbox.errors import from_oserror  # noqa: E402

SECRET = b"top secret, must never change"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_bytes(SECRET)
    (out / "sub").mkdir()
    (out / "sub" / "nested.txt").write_bytes(b"nested")
    return out


@pytest.fixture
def root(tmp_path: Path, outside: Path) -> Path:
    r = tmp_path / "run"
    r.mkdir()
    return r


@pytest.fixture
def sb(root: Path) -> Sandbox:
    return Sandbox(root)


def snapshot(top: Path, skip: Path, *, nlink: bool = True) -> dict[str, tuple]:
    """Everything observable about ``top`` except the ``skip`` subtree.

    ``nlink=False`` ignores link counts of files, for when a legitimate
    operation inside the root drops a hard link that points outside.
    """
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        d = Path(dirpath)
        if d == skip:
            dirnames.clear()
            continue
        st = os.lstat(d)
        out[str(d)] = ("dir", st.st_mode, st.st_mtime_ns, st.st_nlink, tuple(sorted(os.listdir(d))))
        for name in filenames + [n for n in dirnames if (d / n).is_symlink()]:
            p = d / name
            st = os.lstat(p)
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                links = st.st_nlink if nlink else None
                out[str(p)] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, links, st.st_ino, digest)
    return out


# -- construction ---------------------------------------------------------------


def test_root_is_realpath_resolved(tmp_path: Path, root: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    sbx = Sandbox(alias)
    assert sbx.root == root.resolve()
    assert sbx.used_bytes == 0 and sbx.quota_bytes is None


def test_root_must_exist_unless_create(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="expected an existing directory"):
        Sandbox(tmp_path / "nope")
    sbx = Sandbox(tmp_path / "a" / "b" / "c", create=True)
    assert sbx.root.is_dir() and sbx.root == (tmp_path / "a" / "b" / "c").resolve()


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(SandboxError):
        Sandbox(f)
    with pytest.raises(SandboxError):
        Sandbox(tmp_path, quota_bytes=-1)


# -- lexical escapes ---------------------------------------------------------------

HOSTILE_PATHS = ["..", "../x", "a/../../x", "a/../b", "./..", "/etc/passwd", "a\0b", "", "//x"]


def _all_ops(sbx: Sandbox, rel) -> list:
    return [
        lambda: sbx.resolve(rel),
        lambda: sbx.exists(rel),
        lambda: sbx.mkdir(rel),
        lambda: sbx.write_bytes(rel, b"x"),
        lambda: sbx.write_text(rel, "x"),
        lambda: sbx.write_json(rel, {}),
        lambda: sbx.read_bytes(rel),
        lambda: sbx.open_append(rel),
        lambda: sbx.create_file(rel, 4),
        lambda: sbx.create_file(rel, 4, exist_ok=True),
        lambda: sbx.open_file(rel),
        lambda: sbx.remove(rel),
        lambda: sbx.listdir(rel),
        lambda: sbx.promote("src", rel),
        lambda: sbx.promote(rel, "dst"),
        lambda: sbx.hardlink("src", rel),
        lambda: sbx.hardlink(rel, "dst"),
    ]


@pytest.mark.parametrize("rel", HOSTILE_PATHS)
def test_lexical_escapes_refused_everywhere(sb: Sandbox, root: Path, rel: str) -> None:
    sb.write_bytes("src", b"data")
    for op in _all_ops(sb, rel):
        with pytest.raises(EscapeError):
            op()
    assert sorted(os.listdir(root)) == ["src"]


def test_absolute_path_into_outside_refused(sb: Sandbox, outside: Path) -> None:
    target = outside / "pwned"
    for op in _all_ops(sb, str(target)) + _all_ops(sb, target):
        with pytest.raises(EscapeError):
            op()
    assert not target.exists()


def test_escape_message_names_path_and_expectation(sb: Sandbox) -> None:
    with pytest.raises(EscapeError) as ei:
        sb.write_bytes("a/../../x", b"x")
    assert "a/../../x" in str(ei.value) and "expected" in str(ei.value)


def test_bytes_path_refused(sb: Sandbox) -> None:
    with pytest.raises(EscapeError):
        sb.write_bytes(b"x", b"x")  # type: ignore[arg-type]


def test_root_itself_is_not_a_target(sb: Sandbox, root: Path) -> None:
    for rel in (".", "./", "./."):
        with pytest.raises(EscapeError):
            sb.write_bytes(rel, b"x")
        with pytest.raises(EscapeError):
            sb.remove(rel)
        with pytest.raises(EscapeError):
            sb.create_file(rel, 1)
    assert root.is_dir()
    assert sb.mkdir(".") == sb.root
    assert sb.resolve(".") == sb.root


def test_dot_components_are_harmless(sb: Sandbox, root: Path) -> None:
    p = sb.write_bytes("./a//b/./c.txt", b"hi")
    assert p == root.resolve() / "a" / "b" / "c.txt"
    assert (root / "a" / "b" / "c.txt").read_bytes() == b"hi"


# -- symlinks ---------------------------------------------------------------------


def test_symlink_component_pointing_outside(sb: Sandbox, root: Path, outside: Path, tmp_path: Path) -> None:
    (root / "link").symlink_to(outside)
    before = snapshot(tmp_path, root)
    ops = [
        lambda: sb.resolve("link/secret.txt"),
        lambda: sb.exists("link/secret.txt"),
        lambda: sb.write_bytes("link/secret.txt", b"pwned"),
        lambda: sb.write_bytes("link/new.txt", b"pwned"),
        lambda: sb.write_bytes("link/sub/deeper/new.txt", b"pwned"),
        lambda: sb.mkdir("link/newdir"),
        lambda: sb.read_bytes("link/secret.txt"),
        lambda: sb.open_append("link/secret.txt"),
        lambda: sb.create_file("link/new.bin", 8),
        lambda: sb.create_file("link/secret.txt", len(SECRET), exist_ok=True),
        lambda: sb.open_file("link/secret.txt"),
        lambda: sb.listdir("link"),
        lambda: sb.listdir("link/sub"),
        lambda: sb.remove("link/secret.txt"),
        lambda: sb.remove("link/sub"),
        lambda: sb.hardlink("link/secret.txt", "stolen"),
    ]
    for op in ops:
        with pytest.raises(EscapeError):
            op()
    sb.write_bytes("mine", b"x")
    with pytest.raises(EscapeError):
        sb.promote("mine", "link/mine")
    with pytest.raises(EscapeError):
        sb.hardlink("mine", "link/mine")
    assert snapshot(tmp_path, root) == before
    assert (root / "mine").read_bytes() == b"x"


def test_symlink_pointing_inside_is_refused_too(sb: Sandbox, root: Path) -> None:
    (root / "real").mkdir()
    (root / "real" / "f").write_bytes(b"orig")
    (root / "alias").symlink_to(root / "real")
    (root / "rel_alias").symlink_to("real")
    for alias in ("alias", "rel_alias"):
        with pytest.raises(EscapeError, match=alias):
            sb.write_bytes(f"{alias}/f", b"changed")
        with pytest.raises(EscapeError):
            sb.resolve(f"{alias}/f")
        with pytest.raises(EscapeError):
            sb.mkdir(f"{alias}/d")
    assert (root / "real" / "f").read_bytes() == b"orig"
    assert os.listdir(root / "real") == ["f"]


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_as_final_component(sb: Sandbox, root: Path, outside: Path, dangling: bool) -> None:
    target = outside / ("not_yet" if dangling else "secret.txt")
    (root / "f").symlink_to(target)
    size = len(SECRET)
    ops = [
        lambda: sb.write_bytes("f", b"pwned"),
        lambda: sb.write_text("f", "pwned"),
        lambda: sb.write_json("f", {"p": 1}),
        lambda: sb.open_append("f"),
        lambda: sb.create_file("f", size),
        lambda: sb.create_file("f", size, exist_ok=True),
        lambda: sb.open_file("f"),
        lambda: sb.read_bytes("f"),
        lambda: sb.mkdir("f"),
        lambda: sb.hardlink("f", "g"),
        lambda: sb.promote("f", "g"),
    ]
    for op in ops:
        with pytest.raises(EscapeError):
            op()
    assert (root / "f").is_symlink()
    assert not (root / "g").exists()
    if dangling:
        assert not target.exists()
    else:
        assert target.read_bytes() == SECRET


def test_exists_is_true_for_dirs_and_files_and_false_through_a_file(sb: Sandbox, root: Path) -> None:
    assert not sb.exists("a")
    sb.write_bytes("a/b", b"x")
    assert sb.exists("a") and sb.exists("a/b")
    assert not sb.exists("a/b/c")  # through a regular file: just absent
    assert not sb.exists("a/zz/c")


# -- hard-link trick ------------------------------------------------------------------


def test_hard_link_trick_refused(sb: Sandbox, root: Path, outside: Path) -> None:
    os.link(outside / "secret.txt", root / "log.jsonl")
    with pytest.raises(EscapeError, match="hard links"):
        sb.open_append("log.jsonl")
    with pytest.raises(EscapeError, match="hard links"):
        sb.open_file("log.jsonl")
    with pytest.raises(EscapeError, match="hard links"):
        sb.create_file("log.jsonl", len(SECRET), exist_ok=True)
    assert (outside / "secret.txt").read_bytes() == SECRET
    # Replacing by name breaks the link instead of writing through it.
    sb.write_bytes("log.jsonl", b"new")
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert (root / "log.jsonl").read_bytes() == b"new"


# -- whole-file writes -----------------------------------------------------------------


def test_write_bytes_content_and_no_temp_left(sb: Sandbox, root: Path) -> None:
    p = sb.write_bytes("w/x.bin", b"abc")
    assert p == sb.root / "w" / "x.bin" and p.is_absolute()
    assert p.read_bytes() == b"abc"
    sb.write_bytes("w/x.bin", memoryview(b"0123456789")[2:5])
    assert p.read_bytes() == b"234"
    sb.write_bytes("w/x.bin", array.array("I", [1, 2]))
    assert p.read_bytes() == array.array("I", [1, 2]).tobytes()
    sb.write_bytes("w/x.bin", b"", durable=False)
    assert p.read_bytes() == b""
    assert os.listdir(root / "w") == ["x.bin"]
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)


def test_write_bytes_is_atomic_replace(sb: Sandbox, root: Path) -> None:
    sb.write_bytes("f", b"old contents")
    with open(root / "f", "rb") as old:
        old_ino = os.fstat(old.fileno()).st_ino
        sb.write_bytes("f", b"new contents")
        # A reader holding the old file still sees the old bytes: it was replaced, not rewritten.
        assert old.read() == b"old contents"
    assert (root / "f").read_bytes() == b"new contents"
    assert (root / "f").stat().st_ino != old_ino


def test_write_bytes_refuses_directory_target(sb: Sandbox, root: Path) -> None:
    sb.mkdir("d")
    (root / "d" / "keep").write_bytes(b"k")
    with pytest.raises(SandboxError, match="expected a regular file"):
        sb.write_bytes("d", b"x")
    assert (root / "d" / "keep").read_bytes() == b"k"
    sb.write_bytes("plain", b"x")
    with pytest.raises(SandboxError, match="not a directory"):
        sb.write_bytes("plain/x", b"x")


def test_write_text_and_json(sb: Sandbox, root: Path) -> None:
    sb.write_text("t.txt", "héllo")
    assert (root / "t.txt").read_bytes() == "héllo".encode()
    obj = {"b": 1, "a": [1, 2]}
    sb.write_json("meta/run.json", obj, durable=False)
    text = (root / "meta" / "run.json").read_text()
    assert text == json.dumps(obj, indent=2, sort_keys=False) + "\n"
    assert json.loads(text) == obj
    assert sb.read_bytes("meta/run.json") == text.encode()


def test_read_bytes_missing_and_fifo(sb: Sandbox, root: Path) -> None:
    with pytest.raises(SandboxError, match="nope"):
        sb.read_bytes("nope")
    os.mkfifo(root / "fifo")
    with pytest.raises(SandboxError, match="regular file"):
        sb.read_bytes("fifo")  # must not block waiting for a writer
    with pytest.raises(SandboxError):
        sb.open_append("fifo")


def test_open_append(sb: Sandbox, root: Path) -> None:
    with sb.open_append("logs/events.jsonl") as f:
        f.write(json.dumps({"n": 1}) + "\n")
        # line buffered: visible on disk before close
        assert (root / "logs" / "events.jsonl").read_text() == '{"n": 1}\n'
    with sb.open_append("logs/events.jsonl") as f:
        f.write('{"n": 2}\n')
    assert (root / "logs" / "events.jsonl").read_text().splitlines() == ['{"n": 1}', '{"n": 2}']
    assert oct((root / "logs" / "events.jsonl").stat().st_mode & 0o777) == oct(0o644)


def test_mkdir_creates_parents_and_refuses_an_existing_path_when_asked(sb: Sandbox, root: Path) -> None:
    p = sb.mkdir("a/b/c")
    assert p.is_dir() and p == sb.root / "a" / "b" / "c"
    assert sb.mkdir("a/b/c") == p
    with pytest.raises(SandboxError, match="already exists"):
        sb.mkdir("a/b/c", exist_ok=False)
    sb.write_bytes("file", b"x")
    with pytest.raises(SandboxError, match="expected a directory"):
        sb.mkdir("file")
    assert sb.listdir() == ["a", "file"]
    assert sb.listdir("a/b") == ["c"]


# -- PartialFile --------------------------------------------------------------------------


def test_create_file_preallocates_exact_size(sb: Sandbox, root: Path) -> None:
    with sb.create_file("shards/w.bin", 10_000) as pf:
        assert isinstance(pf, PartialFile)
        assert pf.size == 10_000 and pf.path == sb.root / "shards" / "w.bin"
        assert os.stat(pf.path).st_size == 10_000
        assert pf.read_at(0, 16) == b"\0" * 16
    assert (root / "shards" / "w.bin").stat().st_size == 10_000
    with sb.create_file("empty.bin", 0) as pf:
        assert pf.size == 0 and list(pf.iter_chunks(4)) == []
    assert (root / "empty.bin").stat().st_size == 0


def test_write_at_read_at_and_bounds(sb: Sandbox, root: Path) -> None:
    pf = sb.create_file("w.bin", 10)
    pf.write_at(0, b"abc")
    pf.write_at(7, memoryview(b"xyz"))
    pf.write_at(10, b"")  # empty write at the very end is in range
    assert pf.read_at(0, 10) == b"abc\0\0\0\0xyz"
    for offset, data in [(-1, b"a"), (8, b"abc"), (10, b"a"), (11, b"")]:
        with pytest.raises(SandboxError) as ei:
            pf.write_at(offset, data)
        msg = str(ei.value)
        assert f"offset={offset}" in msg and "size=10" in msg
    for offset, length in [(-1, 1), (5, 6), (0, 11), (0, -1)]:
        with pytest.raises(SandboxError, match="size=10"):
            pf.read_at(offset, length)
    assert os.stat(root / "w.bin").st_size == 10  # nothing grew the file
    chunks = list(pf.iter_chunks(4))
    assert [o for o, _ in chunks] == [0, 4, 8]
    assert b"".join(c for _, c in chunks) == b"abc\0\0\0\0xyz"
    with pytest.raises(SandboxError):
        list(pf.iter_chunks(0))
    pf.fsync()
    pf.close()
    pf.close()  # idempotent
    assert pf.closed
    with pytest.raises(SandboxError, match="closed"):
        pf.write_at(0, b"a")
    with pytest.raises(SandboxError, match="closed"):
        pf.read_at(0, 1)
    assert (root / "w.bin").read_bytes() == b"abc\0\0\0\0xyz"


def test_create_file_exist_ok_reopen(sb: Sandbox, root: Path) -> None:
    sbq = Sandbox(root, quota_bytes=100)
    with sbq.create_file("w.bin", 64) as pf:
        pf.write_at(0, b"resume me")
    assert sbq.used_bytes == 64
    with pytest.raises(SandboxError, match="already exists"):
        sbq.create_file("w.bin", 64)
    with sbq.create_file("w.bin", 64, exist_ok=True) as pf:
        assert pf.read_at(0, 9) == b"resume me"  # content kept, not truncated
    assert sbq.used_bytes == 64  # reopening does not charge again
    with pytest.raises(SandboxError, match="expected 65"):
        sbq.create_file("w.bin", 65, exist_ok=True)
    with sbq.open_file("w.bin") as pf:
        assert pf.size == 64 and pf.read_at(0, 9) == b"resume me"
    sbq.mkdir("dir")
    with pytest.raises(SandboxError):
        sbq.create_file("dir", 0, exist_ok=True)
    with pytest.raises(SandboxError):
        sbq.open_file("dir")
    with pytest.raises(SandboxError, match="missing"):
        sbq.open_file("missing")
    with pytest.raises(SandboxError, match="size=-1"):
        sbq.create_file("neg", -1)


def test_disk_full_is_reported_and_cleaned_up(sb: Sandbox, root: Path) -> None:
    # 2**62 bytes is past any filesystem's maximum file size, so fallocate fails
    # up front (EFBIG/ENOSPC) without consuming real disk.
    sbq = Sandbox(root, quota_bytes=2**63)
    with pytest.raises(DiskFullError) as ei:
        sbq.create_file("huge.bin", 2**62)
    assert "huge.bin" in str(ei.value)
    assert isinstance(ei.value.__cause__, OSError)
    assert not (root / "huge.bin").exists()
    assert sbq.used_bytes == 0


def test_oserror_translation() -> None:
    cases = [
        (errno.ENOSPC, DiskFullError),
        (errno.EDQUOT, DiskFullError),
        (errno.EACCES, PermissionDeniedError),
        (errno.EPERM, PermissionDeniedError),
        (errno.EROFS, PermissionDeniedError),
        (errno.ELOOP, EscapeError),
        (errno.EIO, SandboxError),
    ]
    for code, cls in cases:
        err = from_oserror(OSError(code, os.strerror(code)), "a/b.bin", "write")
        assert type(err) is cls
        assert "a/b.bin" in str(err) and "write" in str(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_permission_denied(sb: Sandbox, root: Path) -> None:
    sb.mkdir("ro")
    os.chmod(root / "ro", 0o500)
    try:
        with pytest.raises(PermissionDeniedError, match="ro/x"):
            sb.write_bytes("ro/x", b"x")
    finally:
        os.chmod(root / "ro", 0o755)


# -- promote ------------------------------------------------------------------------------


def test_promote_file(sb: Sandbox, root: Path) -> None:
    with sb.create_file("staging/w.bin", 5) as pf:
        pf.write_at(0, b"12345")
    p = sb.promote("staging/w.bin", "final/w.bin")
    assert p == sb.root / "final" / "w.bin"
    assert p.read_bytes() == b"12345"
    assert not (root / "staging" / "w.bin").exists()
    sb.write_bytes("staging/other.bin", b"other")
    with pytest.raises(SandboxError, match="final/w.bin") as ei:
        sb.promote("staging/other.bin", "final/w.bin")
    assert "expected it not to exist" in str(ei.value)
    assert (root / "final" / "w.bin").read_bytes() == b"12345"
    assert (root / "staging" / "other.bin").read_bytes() == b"other"
    with pytest.raises(SandboxError, match="does not exist"):
        sb.promote("staging/nope", "final/nope")


def test_promote_directory(sb: Sandbox, root: Path) -> None:
    sb.write_bytes("stage/model/a.bin", b"A")
    sb.write_bytes("stage/model/sub/b.bin", b"B")
    sb.mkdir("stage/model/empty")
    p = sb.promote("stage/model", "published/model")
    assert sorted(os.listdir(p)) == ["a.bin", "empty", "sub"]
    assert (p / "sub" / "b.bin").read_bytes() == b"B"
    assert not (root / "stage" / "model").exists()

    sb.write_bytes("stage/model2/c.bin", b"C")
    with pytest.raises(SandboxError, match="published/model"):
        sb.promote("stage/model2", "published/model")
    assert (root / "stage" / "model2" / "c.bin").read_bytes() == b"C"
    assert (p / "a.bin").read_bytes() == b"A"
    # even an empty existing directory is not replaced
    sb.mkdir("published/empty_dst")
    with pytest.raises(SandboxError, match="empty_dst"):
        sb.promote("stage/model2", "published/empty_dst")
    assert (root / "stage" / "model2" / "c.bin").exists()
    with pytest.raises(SandboxError, match="inside the source"):
        sb.promote("stage/model2", "stage/model2/x")


def test_promote_refuses_tree_with_symlink(sb: Sandbox, root: Path, outside: Path) -> None:
    sb.write_bytes("stage/m/a.bin", b"A")
    (root / "stage" / "m" / "evil").symlink_to(outside / "secret.txt")
    with pytest.raises(EscapeError, match="evil"):
        sb.promote("stage/m", "pub/m")
    assert (root / "stage" / "m" / "a.bin").exists()
    assert not (root / "pub" / "m").exists()


# -- hardlink -------------------------------------------------------------------------------


def test_hardlink_same_inode(sb: Sandbox, root: Path) -> None:
    sbq = Sandbox(root, quota_bytes=4)
    sbq.write_bytes("cache/w.bin", b"WWWW")
    p = sbq.hardlink("cache/w.bin", "run1/w.bin")
    assert p == sbq.root / "run1" / "w.bin"
    a, b = os.stat(root / "cache" / "w.bin"), os.stat(p)
    assert a.st_ino == b.st_ino and a.st_dev == b.st_dev
    assert b.st_nlink == 2
    assert sbq.used_bytes == 4  # no copy, no charge
    assert sbq.read_bytes("run1/w.bin") == b"WWWW"  # reading through a link is fine
    with pytest.raises(SandboxError, match="run1/w.bin"):
        sbq.hardlink("cache/w.bin", "run1/w.bin")


def test_hardlink_refusals(sb: Sandbox, root: Path, outside: Path) -> None:
    sb.write_bytes("src.bin", b"S")
    (root / "ln").symlink_to(root / "src.bin")
    with pytest.raises(EscapeError, match="symlink"):
        sb.hardlink("ln", "dst.bin")
    for dst in ("../outside/x", str(outside / "x"), "/tmp/x"):
        with pytest.raises(EscapeError):
            sb.hardlink("src.bin", dst)
    (root / "out").symlink_to(outside)
    with pytest.raises(EscapeError):
        sb.hardlink("src.bin", "out/x")
    sb.mkdir("d")
    with pytest.raises(SandboxError, match="regular file"):
        sb.hardlink("d", "d2")
    with pytest.raises(SandboxError, match="does not exist"):
        sb.hardlink("missing", "d3")
    assert not (outside / "x").exists()
    assert os.stat(root / "src.bin").st_nlink == 1


# -- quota ---------------------------------------------------------------------------------


def test_quota_exceeded_before_any_byte(tmp_path: Path) -> None:
    sbq = Sandbox(tmp_path / "q", quota_bytes=10, create=True)
    with pytest.raises(QuotaExceeded) as ei:
        sbq.write_bytes("sub/big.bin", b"x" * 11)
    e = ei.value
    assert (e.requested, e.used, e.quota) == (11, 0, 10)
    assert "sub/big.bin" in str(e)
    assert os.listdir(sbq.root) == []  # no file, no temp, not even the parent dir
    sbq.write_bytes("a", b"x" * 6)
    with pytest.raises(QuotaExceeded) as ei:
        sbq.create_file("b/c.bin", 5)
    assert (ei.value.requested, ei.value.used, ei.value.quota) == (5, 6, 10)
    assert sorted(os.listdir(sbq.root)) == ["a"]
    with sbq.create_file("c.bin", 4):
        pass
    assert sbq.used_bytes == 10
    with pytest.raises(QuotaExceeded):
        sbq.write_bytes("d", b"x")
    sbq.write_bytes("empty", b"")  # zero bytes always fit
    assert sorted(os.listdir(sbq.root)) == ["a", "c.bin", "empty"]


def test_failed_write_refunds_quota(tmp_path: Path) -> None:
    sbq = Sandbox(tmp_path / "q", quota_bytes=10, create=True)
    sbq.write_bytes("plain", b"x")
    with pytest.raises(SandboxError):
        sbq.write_bytes("plain/inner", b"12345")
    with pytest.raises(EscapeError):
        sbq.create_file("../escape", 5)
    assert sbq.used_bytes == 1


# -- remove ---------------------------------------------------------------------------------


def test_remove_does_not_follow_symlinks(sb: Sandbox, root: Path, outside: Path) -> None:
    (root / "to_dir").symlink_to(outside)
    (root / "to_file").symlink_to(outside / "secret.txt")
    sb.mkdir("tree/deep")
    (root / "tree" / "deep" / "escape_dir").symlink_to(outside / "sub")
    (root / "tree" / "escape_file").symlink_to(outside / "secret.txt")
    sb.write_bytes("tree/deep/f", b"x")
    sb.remove("to_dir")
    sb.remove("to_file")
    sb.remove("tree")
    assert os.listdir(root) == []
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert (outside / "sub" / "nested.txt").read_bytes() == b"nested"


def test_remove_file_missing_and_through_link(sb: Sandbox, root: Path, outside: Path) -> None:
    sb.write_bytes("f", b"x")
    sb.remove("f")
    assert not (root / "f").exists()
    with pytest.raises(SandboxError, match="does not exist"):
        sb.remove("f")
    sb.remove("f", missing_ok=True)
    sb.remove("no/such/dir", missing_ok=True)
    (root / "link").symlink_to(outside)
    with pytest.raises(EscapeError):
        sb.remove("link/secret.txt")
    with pytest.raises(EscapeError):
        sb.remove("link/secret.txt", missing_ok=True)
    assert (outside / "secret.txt").read_bytes() == SECRET


def test_disk_free(sb: Sandbox) -> None:
    assert isinstance(sb.disk_free(), int) and sb.disk_free() > 0


# -- nothing outside changes ------------------------------------------------------------------


def test_hostile_series_leaves_outside_untouched(tmp_path: Path, root: Path, outside: Path) -> None:
    sbq = Sandbox(root, quota_bytes=1 << 20)
    (root / "link_out").symlink_to(outside)
    (root / "link_up").symlink_to("..")
    (root / "link_file").symlink_to(outside / "secret.txt")
    (root / "dangling").symlink_to(outside / "created_by_attack")
    os.link(outside / "secret.txt", root / "hard.jsonl")
    before = snapshot(tmp_path, root)

    attacks = [
        lambda: sbq.write_bytes("../outside/secret.txt", b"pwned"),
        lambda: sbq.write_bytes(str(outside / "secret.txt"), b"pwned"),
        lambda: sbq.write_bytes("a/../../outside/new", b"pwned"),
        lambda: sbq.write_bytes("link_out/secret.txt", b"pwned"),
        lambda: sbq.write_bytes("link_up/outside/secret.txt", b"pwned"),
        lambda: sbq.write_bytes("link_file", b"pwned"),
        lambda: sbq.write_bytes("dangling", b"pwned"),
        lambda: sbq.write_json("link_out/x.json", {"p": 1}),
        lambda: sbq.write_text("x\0/../../outside/secret.txt", "pwned"),
        lambda: sbq.open_append("link_file"),
        lambda: sbq.open_append("dangling"),
        lambda: sbq.open_append("hard.jsonl"),
        lambda: sbq.open_append("link_out/log.jsonl"),
        lambda: sbq.create_file("link_out/big.bin", 100),
        lambda: sbq.create_file("dangling", 100),
        lambda: sbq.create_file("hard.jsonl", len(SECRET), exist_ok=True),
        lambda: sbq.open_file("hard.jsonl"),
        lambda: sbq.open_file("link_file"),
        lambda: sbq.mkdir("link_out/newdir"),
        lambda: sbq.mkdir("../outside/newdir"),
        lambda: sbq.remove("../outside"),
        lambda: sbq.remove("link_out/secret.txt"),
        lambda: sbq.remove("link_up/outside"),
        lambda: sbq.remove(str(outside)),
        lambda: sbq.listdir("link_out"),
        lambda: sbq.hardlink("link_file", "stolen"),
        lambda: sbq.hardlink("link_out/secret.txt", "stolen"),
        lambda: sbq.hardlink("hard.jsonl", "../outside/linked"),
        lambda: sbq.promote("hard.jsonl", "../outside/promoted"),
        lambda: sbq.promote("hard.jsonl", "link_out/promoted"),
        lambda: sbq.promote("link_out", "moved"),
        lambda: sbq.read_bytes("link_file"),
    ]
    for i, attack in enumerate(attacks):
        with pytest.raises(SandboxError):
            attack()
        assert snapshot(tmp_path, root) == before, f"attack #{i} changed something outside the root"

    # Legitimate operations on the hostile entries only touch the root.
    sbq.write_bytes("hard.jsonl", b"replaced, link broken")
    for name in ("link_out", "link_up", "link_file", "dangling"):
        sbq.remove(name)
    sbq.write_bytes("tmp/a", b"a")
    sbq.promote("tmp", "done")
    sbq.remove("done")
    # Replacing hard.jsonl dropped the outside file's link count from 2 to 1; nothing else moved.
    assert snapshot(tmp_path, root, nlink=False) == {
        k: (v[:4] + (None,) + v[5:] if v[0] == "file" else v) for k, v in before.items()
    }
    assert (outside / "secret.txt").stat().st_nlink == 1
    assert sorted(os.listdir(root)) == ["hard.jsonl"]
    assert (outside / "secret.txt").read_bytes() == SECRET


def test_symlink_swap_race_never_escapes(sb: Sandbox, root: Path, outside: Path, tmp_path: Path) -> None:
    """A directory swapped for a symlink between check and use must not redirect writes.

    renameat2(RENAME_EXCHANGE) flips ``d`` between a real directory and a symlink
    to ``outside`` atomically while another thread writes into ``d/``; only the
    fd-based walk (not an lstat-then-open check) survives this.
    """
    import ctypes
    import threading
    import time

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("libc without renameat2")
    (root / "d").mkdir()
    (root / "evil").symlink_to(outside)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    a, b = os.fsencode(root / "d"), os.fsencode(root / "evil")
    if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
        pytest.skip(f"RENAME_EXCHANGE unsupported: {os.strerror(ctypes.get_errno())}")
    before = snapshot(tmp_path, root)

    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)

    t = threading.Thread(target=swapper)
    t.start()
    ok = refused = 0
    try:
        deadline = time.monotonic() + 0.5
        i = 0
        while time.monotonic() < deadline:
            i += 1
            for op in (
                lambda: sb.write_bytes(f"d/w{i}", b"pwned", durable=False),
                lambda: sb.create_file(f"d/c{i}", 1).close(),
                lambda: sb.open_append("d/log").close(),
                lambda: sb.mkdir(f"d/m{i}"),
            ):
                try:
                    op()
                    ok += 1
                except SandboxError:
                    refused += 1
    finally:
        stop.set()
        t.join()
    assert snapshot(tmp_path, root) == before
    assert ok + refused > 0
