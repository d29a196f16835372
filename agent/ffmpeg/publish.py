"""Publishing a completed output: atomically, and never over a file the job does not own.

The spec's `overwrite` decides what an existing file at the output path means:

- `overwrite: true`: it is replaced atomically (`rename(2)`; across file systems a copy beside
  it, then a rename): readers see the old file or the new one, never a part.
- `overwrite: false` (the default): it is kept, and the attempt ends `failed
  reason=output_exists` - checked before ffmpeg runs (`agent.ffmpeg.argv.build_plan`) and again
  by the move itself, which never replaces a file that appeared meanwhile: `renameat2(2)` with
  RENAME_NOREPLACE, or where the file system lacks it a hard link then an unlink (across file
  systems the copy beside the destination is linked into place the same way).

Except a file written by an earlier attempt of the same job (its output moved into place, then
its DONE lost): every published file carries the extended attribute `user.ffrtmp.job` = the job
id, and a file carrying this job's id is replaced like with `overwrite: true`. Where the file
system has no user extended attributes (some NFS, FUSE or old tmpfs mounts) nothing is marked
and an existing file is never taken for the job's own: a retry after an output landed ends
`output_exists` (set `overwrite: true` for such jobs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

OWNER_XATTR = "user.ffrtmp.job"
RENAME_NOREPLACE = 1
AT_FDCWD = -100
# renameat2 errors meaning "not here" (old kernel or libc, a file system without the flag).
UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})


class OutputExists(Exception):
    """The output path holds a file this job may not replace (reason `output_exists`)."""


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(src, dst) failing with FileExistsError if dst exists (atomic, in the kernel);
    OSError(ENOSYS/EINVAL/...) where unsupported, OSError(EXDEV) across file systems."""
    if _RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "renameat2 not available")
    if _RENAMEAT2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dst))


def owner_of(path: Path | str) -> int | None:
    """The job id recorded on a published file, or None (not marked, no xattr support)."""
    try:
        return int(os.getxattr(path, OWNER_XATTR))
    except (OSError, ValueError):
        return None


def mark_owner(path: Path | str, job_id: int | None) -> bool:
    """Record the job on the file (best effort: False where the file system cannot)."""
    if job_id is None:
        return False
    try:
        os.setxattr(path, OWNER_XATTR, str(job_id).encode())
    except OSError:
        return False
    return True


def publish(src: Path, dst: Path, job_id: int | None, overwrite: bool) -> None:
    """Move the completed output src to dst (see the module's docstring).

    Raises OutputExists if dst holds a file that may not be replaced, OSError otherwise.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    mark_owner(src, job_id)  # the mark moves with the inode: the file appears marked
    if _move(src, dst, job_id, overwrite):
        return
    partial = _copy_beside(src, dst, job_id)  # another file system: a copy on dst's first
    try:
        if not _move(partial, dst, job_id, overwrite):
            raise OSError(errno.EXDEV, "the copy beside the output is on another file system",
                          str(dst))
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _move(src: Path, dst: Path, job_id: int | None, overwrite: bool) -> bool:
    """One move on one file system; False if src and dst are on different ones."""
    if overwrite:
        return _move_replace(src, dst)
    try:
        return _move_noreplace(src, dst)
    except FileExistsError:
        owner = owner_of(dst)
        if job_id is not None and owner == job_id:  # an earlier attempt of this job wrote it
            return _move_replace(src, dst)
        by = f" (written by job {owner})" if owner is not None else ""
        raise OutputExists(f"output {dst} appeared while the job ran{by}: not replaced, the "
                           "spec has overwrite: false") from None


def _move_replace(src: Path, dst: Path) -> bool:
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno == errno.EXDEV:
            return False
        raise
    return True


def _move_noreplace(src: Path, dst: Path) -> bool:
    try:
        rename_noreplace(src, dst)
        return True
    except OSError as e:
        if e.errno == errno.EXDEV:
            return False
        if e.errno not in UNSUPPORTED:
            raise
    try:  # a hard link fails with EEXIST rather than replace: dst appears whole, or not at all
        os.link(src, dst)
    except OSError as e:
        if e.errno == errno.EXDEV:
            return False
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(e.errno, "the output's file system supports neither "
                          "RENAME_NOREPLACE nor hard links, so the output cannot be published "
                          "without risking replacing a file (use overwrite: true there)",
                          str(dst)) from e
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src)
    return True


def _copy_beside(src: Path, dst: Path, job_id: int | None) -> Path:
    """A marked copy of src in dst's directory, under a fresh hidden name."""
    partial = dst.with_name(f".{dst.name[:200]}.{secrets.token_hex(4)}.partial")
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    try:
        shutil.copyfile(src, partial)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    mark_owner(partial, job_id)
    return partial
