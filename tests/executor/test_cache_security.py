"""The shader cache loads native code, so nothing in it may come from anyone but the user.

Each test plants what an attacker sharing the cache could write (a shared library, a runtime object,
a header stub, a record naming a planted file) or loosens the cache's ownership or permissions, and
asserts that the executor refuses it — and, for planted code, that the code never ran.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

SOURCE = """
kernel void fill(device float* out, constant float& v, uint i [[thread_position_in_grid]]) {
    out[i] = v;
}
"""

FOREIGN_UID = 54321


@pytest.fixture
def cache(executor, tmp_path, monkeypatch):
    """A fresh cache root and a fresh in-process library table; returns the executor's cache dir."""
    root = tmp_path / "cache"
    monkeypatch.setenv("METALCORE_CACHE", str(root))
    monkeypatch.setattr(executor, "_libraries", {})
    return root / "executor"


def _fill_works(executor):
    x = torch.zeros(8)
    executor.compile_shader(SOURCE).fill(x, 2.0)
    assert torch.equal(x, torch.full((8,), 2.0))


def _planted_library(tmp_path: Path, marker: Path) -> bytes:
    """A shared library whose constructor creates ``marker``: proof that it was loaded."""
    src = tmp_path / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
                   f'  FILE* f = fopen("{marker}", "w"); if (f) fclose(f);\n}}\n')
    from metalcore.executor import find_compiler

    out = tmp_path / "planted.so"
    subprocess.run([find_compiler(), "-x", "c", "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
    return out.read_bytes()


def _only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_cache_directory_is_created_private(executor, cache):
    _fill_works(executor)
    assert cache.stat().st_mode & 0o777 == 0o700
    for f in cache.iterdir():
        assert f.stat().st_uid == os.geteuid() and not f.stat().st_mode & 0o022, f


def test_cache_directories_are_private_whatever_the_umask(executor, tmp_path, monkeypatch):
    monkeypatch.setenv("METALCORE_CACHE", str(tmp_path / "a" / "b"))
    old = os.umask(0)
    try:
        path = executor.cache_dir()
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in (path, path.parent, path.parent.parent)] == [0o700] * 3


def test_cache_root_follows_xdg_cache_home(executor, tmp_path, monkeypatch):
    monkeypatch.delenv("METALCORE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert executor.cache_dir() == tmp_path / "xdg" / "metalcore" / "executor"


def test_group_or_world_writable_cache_directory_is_refused(executor, cache):
    _fill_works(executor)
    cache.chmod(0o777)
    executor._libraries.clear()
    with pytest.raises(executor.MetalCacheError, match=rf"{cache}.*writable by group or others.*METALCORE_CACHE"):
        executor.compile_shader(SOURCE)


def test_cache_under_a_shared_non_sticky_directory_is_refused(executor, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could rename our cache directory away and put theirs in its place
    monkeypatch.setenv("METALCORE_CACHE", str(shared))
    monkeypatch.setattr(executor, "_libraries", {})
    with pytest.raises(executor.MetalCacheError, match=rf"{shared}.*not sticky"):
        executor.compile_shader(SOURCE)


def test_cache_directory_of_another_user_is_refused(executor, cache, monkeypatch):
    _fill_works(executor)
    executor._libraries.clear()
    from metalcore.executor import _cache

    monkeypatch.setattr(_cache, "_uid", lambda: os.geteuid() + 1)  # the directory now belongs to someone else
    with pytest.raises(executor.MetalCacheError, match=rf"{cache}: it belongs to user id"):
        executor.compile_shader(SOURCE)


def test_tampered_shader_library_is_refused_and_never_loaded(executor, cache, tmp_path):
    _fill_works(executor)
    executor._libraries.clear()
    marker = tmp_path / "planted-code-ran"
    so = _only(cache, "shader-*.so")
    so.unlink()  # a new file: this process still maps the old one, whose pages must not change under it
    so.write_bytes(_planted_library(tmp_path, marker))  # same name, other contents
    with pytest.raises(executor.MetalCacheError, match=rf"{so} does not match its record"):
        executor.compile_shader(SOURCE)
    assert not marker.exists()


def _plant_pair(cache: Path, stem_glob: str, data: bytes, *, mode: int, uid: int | None) -> None:
    """Replace the artifact of one stem by ``data``, with a record that names and hashes it correctly:
    what someone who can write into the cache (and compute the key) would do."""
    import hashlib
    import json

    record = _only(cache, stem_glob)
    stem = record.name[:-len(".json")]
    old = json.loads(record.read_text())
    (cache / old["file"]).unlink()
    digest = hashlib.sha256(data).hexdigest()
    name = f"{stem}-{digest[:16]}{Path(old['file']).suffix}"
    (cache / name).write_bytes(data)
    record.write_text(json.dumps({"file": name, "sha256": digest, "meta": old["meta"]}))
    for f in (cache / name, record):
        f.chmod(mode)
        if uid is not None:
            os.chown(f, uid, uid)


def test_planted_world_writable_library_with_a_matching_record_is_refused(executor, cache, tmp_path):
    _fill_works(executor)
    executor._libraries.clear()
    marker = tmp_path / "planted-code-ran"
    _plant_pair(cache, "shader-*.json", _planted_library(tmp_path, marker), mode=0o666, uid=None)
    with pytest.raises(executor.MetalCacheError, match=r"shader-.*\.json: it is writable by group or others"):
        executor.compile_shader(SOURCE)
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_planted_library_owned_by_another_user_is_refused(executor, cache, tmp_path):
    _fill_works(executor)
    executor._libraries.clear()
    marker = tmp_path / "planted-code-ran"
    _plant_pair(cache, "shader-*.json", _planted_library(tmp_path, marker), mode=0o644, uid=FOREIGN_UID)
    with pytest.raises(executor.MetalCacheError, match=rf"belongs to user id {FOREIGN_UID}, not to you"):
        executor.compile_shader(SOURCE)
    assert not marker.exists()


def test_tampered_runtime_object_is_refused(executor, cache):
    _fill_works(executor)
    executor._libraries.clear()
    obj = _only(cache, "runtime-*.o")
    obj.write_bytes(obj.read_bytes()[:-64] + b"\0" * 64)
    other = SOURCE.replace("out[i] = v;", "out[i] = v + 1.0f;")  # not cached yet: links the runtime
    with pytest.raises(executor.MetalCacheError, match=rf"{obj} does not match its record"):
        executor.compile_shader(other)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_runtime_object_owned_by_another_user_is_refused(executor, cache):
    _fill_works(executor)
    executor._libraries.clear()
    os.chown(_only(cache, "runtime-*.o"), FOREIGN_UID, FOREIGN_UID)
    with pytest.raises(executor.MetalCacheError, match=rf"runtime-.*\.o: it belongs to user id {FOREIGN_UID}"):
        executor.compile_shader(SOURCE.replace("out[i] = v;", "out[i] = 2.0f * v;"))


def test_symlinked_cache_file_is_refused(executor, cache, tmp_path):
    _fill_works(executor)
    executor._libraries.clear()
    record = _only(cache, "shader-*.json")
    elsewhere = tmp_path / "elsewhere.json"
    shutil.copy(record, elsewhere)
    record.unlink()
    record.symlink_to(elsewhere)
    with pytest.raises(executor.MetalCacheError, match=str(record)):
        executor.compile_shader(SOURCE)


def test_a_stub_planted_for_metal_stdlib_is_not_used(executor, cache):
    """The empty stand-ins for <metal_stdlib> are written per build in a private temporary directory,
    never read from the cache."""
    cache.mkdir(parents=True, mode=0o700)
    (cache / "include").mkdir()
    (cache / "include" / "metal_stdlib").write_text('#error "planted header"\n')
    x = torch.zeros(4)
    executor.compile_shader("#include <metal_stdlib>\nusing namespace metal;\n" + SOURCE).fill(x, 1.0)
    assert torch.equal(x, torch.ones(4))


@pytest.mark.parametrize("include", ['"/etc/hostname"', "</etc/hostname>", '"../../../etc/hostname"',
                                     '"include/../../x.h"'])
def test_include_of_a_file_outside_the_source_is_refused(executor, cache, include):
    with pytest.raises(executor.MetalCompileError, match="refused"):
        executor.compile_shader(f"#include {include}\n" + SOURCE)


def test_include_through_a_macro_is_refused(executor, cache, tmp_path):
    header = tmp_path / "evil.h"
    header.write_text("#define EVIL 1\n")
    with pytest.raises(executor.MetalCompileError, match=rf"#include of '{header}' refused"):
        executor.compile_shader(f'#define H "{header}"\n#include H\n' + SOURCE)


def test_key_covers_the_headers_and_the_compiler(executor, cache, tmp_path, monkeypatch):
    """A change to what is compiled (the executor's header) or to the compiler builds a new library."""
    from metalcore.executor import _build

    _fill_works(executor)
    assert len(list(cache.glob("shader-*.json"))) == 1
    copy = tmp_path / "executor-files"
    shutil.copytree(_build.HERE, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    with open(copy / "metal_stdlib.h", "a") as f:
        f.write("\n// changed\n")
    monkeypatch.setattr(_build, "HERE", copy)
    executor._libraries.clear()
    _fill_works(executor)
    assert len(list(cache.glob("shader-*.json"))) == 2
    version = _build._version(executor.find_compiler())
    monkeypatch.setitem(_build._version_cache, executor.find_compiler(), version + " (patched)")
    executor._libraries.clear()
    _fill_works(executor)
    assert len(list(cache.glob("shader-*.json"))) == 3
