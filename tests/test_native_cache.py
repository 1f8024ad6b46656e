"""The native code's cache folder (engine/fastpath/native_cache.py): created private, a library loads only when its
owner, mode and SHA-256 check out, anything else at its path is rebuilt, and an untrusted folder turns native
code off with one warning while the run goes on in torch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from rlhf_magic.engine.fastpath import cpu_pool, native, native_cache

CC = shutil.which("gcc") or shutil.which("cc")
COMMAND = [CC or "cc", "-shared", "-fPIC"]
SOURCE = "int answer(void) { return 42; }\n"
compiler = pytest.mark.skipif(CC is None or os.name != "posix", reason="needs a C compiler on a POSIX system")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder (RLHF_MAGIC_CACHE), and the cached native libraries are looked up
    again before and after it."""
    monkeypatch.setenv("RLHF_MAGIC_CACHE", str(tmp_path / "cache"))
    native.skinny_kernel.cache_clear()
    native._lora_kernel.cache_clear()
    cpu_pool._library.cache_clear()
    yield
    monkeypatch.undo()
    native.skinny_kernel.cache_clear()
    native._lora_kernel.cache_clear()
    cpu_pool._library.cache_clear()


def planted_source(marker: Path, answer: int = 7) -> str:
    """A library whose constructor, run by the dynamic loader the moment it loads, appends to `marker`."""
    return (
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'  FILE* f = fopen("{marker}", "a"); if (f) {{ fputs("ran\\n", f); fclose(f); }}\n'
        "}\n"
        f"int answer(void) {{ return {answer}; }}\n"
    )


def compile_to(path: Path, source: str, mode: int = 0o700) -> str:
    """Compile `source` into `path` outside rlhf-magic (what someone planting a library does); its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    src = path.parent / "planted.c"
    src.write_text(source)
    subprocess.run([*COMMAND, str(src), "-o", str(path)], check=True, capture_output=True)
    src.unlink()
    os.chmod(path, mode)
    return native_cache.sha256(path)


def write_manifest(entries: dict[str, str], mode: int = 0o600) -> Path:
    path = native_cache.folder() / native_cache.MANIFEST
    path.write_text(json.dumps(entries))
    os.chmod(path, mode)
    return path


def answer_of(key: str) -> int:
    lib = native_cache.load_library("probe", SOURCE, COMMAND, "c", key=key)
    lib.answer.restype = int
    return lib.answer()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=["umask 000", "umask 022", "umask 277"])
def test_the_cache_folder_and_the_parents_it_creates_are_0700_whatever_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setenv("RLHF_MAGIC_CACHE", str(tmp_path / "new" / "cache"))
    old = os.umask(umask)  # mkdir's mode is masked by it: 0277 would leave 0500, a folder nothing can be built in
    try:
        where = native_cache.secure_folder(native_cache.folder())
    finally:
        os.umask(old)
    assert where == tmp_path / "new" / "cache" / "native"
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (where, where.parent, where.parent.parent)] == [0o700] * 3


@compiler
@pytest.mark.fastpath
def test_a_library_planted_at_the_predictable_path_is_rebuilt_never_loaded(tmp_path):
    marker = tmp_path / "marker"
    path = native_cache.library_path("probe", SOURCE, COMMAND, key="planted")
    native_cache.secure_folder(path.parent)
    compile_to(path, planted_source(marker))  # owned by the user, mode 0700: only the manifest can tell
    assert answer_of("planted") == 42  # a fresh build was loaded
    assert not marker.exists()  # the planted library's constructor never ran
    assert native_cache.read_manifest(path.parent)[path.name] == native_cache.sha256(path)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o022 == 0
    manifest = path.parent / native_cache.MANIFEST
    assert stat.S_IMODE(os.stat(manifest).st_mode) == 0o600


@compiler
@pytest.mark.fastpath
def test_a_library_with_a_matching_manifest_entry_loads_from_the_cache(tmp_path):
    """The control for the tests around it: the same planted library, recorded in a private manifest and not
    writable by others, is what a cached build looks like, and it is loaded as it is."""
    marker = tmp_path / "marker"
    path = native_cache.library_path("probe", SOURCE, COMMAND, key="recorded")
    native_cache.secure_folder(path.parent)
    digest = compile_to(path, planted_source(marker), mode=0o755)
    write_manifest({path.name: digest})
    assert answer_of("recorded") == 7 and marker.read_text() == "ran\n"


@compiler
@pytest.mark.fastpath
@pytest.mark.parametrize(
    "lib_mode, manifest_mode, recorded",
    [
        (0o775, 0o600, "right"),  # the library is group-writable: anyone in the group could swap it
        (0o757, 0o600, "right"),  # ... or writable by everyone
        (0o700, 0o600, "wrong"),  # the manifest records another build
        (0o700, 0o660, "right"),  # the manifest itself is group-writable: it proves nothing
    ],
    ids=["group-writable library", "world-writable library", "wrong hash", "group-writable manifest"],
)
def test_a_library_that_fails_a_check_is_rebuilt_not_loaded(tmp_path, lib_mode, manifest_mode, recorded):
    marker = tmp_path / "marker"
    key = f"{lib_mode:o}-{manifest_mode:o}-{recorded}"
    path = native_cache.library_path("probe", SOURCE, COMMAND, key=key)
    native_cache.secure_folder(path.parent)
    digest = compile_to(path, planted_source(marker), mode=lib_mode)
    write_manifest({path.name: digest if recorded == "right" else "0" * 64}, mode=manifest_mode)
    assert answer_of(key) == 42
    assert not marker.exists()
    assert native_cache.verified(path)  # the rebuild is recorded: the next process loads it


@pytest.mark.parametrize("why", ["owner", "mode"])
def test_an_untrusted_cache_folder_turns_native_code_off_with_one_warning(tmp_path, monkeypatch, caplog, why):
    where = native_cache.folder()
    where.mkdir(parents=True, mode=0o700)
    if why == "owner":  # another user's folder: this process stands in for that user's uid
        monkeypatch.setattr(native_cache, "_uid", lambda: os.getuid() + 1)
        reason = f"owned by uid {os.getuid()}, not by you (uid {os.getuid() + 1})"
    else:  # this user's, open to the group, on a file system that ignores chmod
        os.chmod(where, 0o770)
        monkeypatch.setattr(native_cache.os, "chmod", lambda *a, **k: None)
        reason = "writable by group or others (mode 0770)"
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            with pytest.raises(native_cache.NativeCodeOff):
                native_cache.load_library("probe", SOURCE, COMMAND, "c", key=why)
        assert native.skinny_kernel() is None and native.lora_kernel() is None
        with cpu_pool.pooled(torch.device("cpu")) as on:
            assert not on
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"rlhf-magic: native code off, using torch: the cache folder {where} is {reason}; set RLHF_MAGIC_CACHE to "
        f"a folder only you can write"
    ]
    assert sorted(p.name for p in where.iterdir()) == []  # nothing was built into it


@compiler
@pytest.mark.fastpath
def test_a_folder_of_ones_own_open_to_others_is_made_private_and_its_libraries_checked(tmp_path, caplog):
    """What an older version left under the umask 002 (0775): made 0700, and a library someone else could have put
    there (not in the manifest) is rebuilt, not loaded."""
    marker = tmp_path / "marker"
    path = native_cache.library_path("probe", SOURCE, COMMAND, key="open")
    path.parent.mkdir(parents=True)
    os.chmod(path.parent, 0o775)
    compile_to(path, planted_source(marker))
    with caplog.at_level(logging.WARNING):
        assert answer_of("open") == 42
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert not marker.exists() and not caplog.records


def test_a_run_still_works_when_native_code_is_off(monkeypatch):
    from rlhf_magic import api

    monkeypatch.setattr(native_cache, "_uid", lambda: os.getuid() + 1)
    native_cache.folder().mkdir(parents=True, mode=0o700)
    answers = api.load_policy("tiny").generate(["Say hi.", "Count to 3."], max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert native.skinny_kernel() is None


@compiler
@pytest.mark.fastpath
@pytest.mark.skipif(
    not native._cpu_supported() or os.environ.get("RLHF_MAGIC_NATIVE") == "0", reason="needs AVX2/FMA, native on"
)
def test_the_native_kernels_build_through_the_checked_cache(tmp_path):
    """native.py goes through native_cache: a library planted at the kernels' own predictable path never runs,
    and the kernel built in its place passes its check product. (Nothing may load that path in this process
    before: the loader would hand back the library it already holds.)"""
    marker = tmp_path / "marker"
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    path = native_cache.library_path("skinny", native.SOURCE, [cc, *native.FLAGS])
    native_cache.secure_folder(path.parent)
    compile_to(path, planted_source(marker))
    assert native.skinny_kernel() is not None and native.lora_kernel() is not None
    assert not marker.exists() and native_cache.verified(path)
