"""Files the data tools write and read: written whole or not at all, checked before they replace
anything, a full disk reported by name, the settings a resumable run recorded compared key by key,
and teacher checkpoints known by their contents.

Every output goes to a temporary file next to its final path (a dot name carrying the host name
and process id, so concurrent writers never share one), is optionally checked and made durable,
and is then renamed into place with :func:`os.replace`, atomic on POSIX: a kill, a failed check or
a full disk leaves the previous file (or none) in place, never a half-written or miscounted one.
"""

import contextlib
import errno
import hashlib
import json
import os
import socket
from typing import IO, Callable, Iterator, List, Optional, Type

from fairseq_kd.cli.errors import UserError
from fairseq_kd.teacher import split_teacher_paths

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """The file system ran out of space (or quota) while a file was written."""


def temporary_path(path: str) -> str:
    """The temporary name :func:`atomic_output` writes ``path`` under: ``.NAME.HOST.PID.tmp``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{socket.gethostname()}.{os.getpid()}.tmp")


def is_temporary(name: str) -> bool:
    """Whether a directory entry is one of :func:`temporary_path`'s files."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_output(
    path: str, verify: Optional[Callable[[str], None]] = None, durable: bool = False, exclusive: bool = False
) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s contents to; then ``verify(tmp)`` (which raises
    to refuse the file), ``fsync`` if ``durable``, and rename it to ``path``.

    With ``exclusive`` the file is linked to ``path`` instead, which raises
    :class:`FileExistsError` when ``path`` exists: of several processes writing the same record at
    once, the first one's stays and the others can compare theirs with it.

    On any failure the temporary file is removed and ``path`` is left as it was; running out of
    space raises :class:`DiskFullError` naming ``path``.
    """
    tmp = temporary_path(path)
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as err:
        raise disk_full_error(err, path) or err
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_file(
    path: str,
    write: Callable[[IO], None],
    binary: bool = False,
    verify: Optional[Callable[[str], None]] = None,
    durable: bool = False,
    exclusive: bool = False,
) -> None:
    """Write ``path`` through :func:`atomic_output` (same ``verify``, ``durable`` and ``exclusive``):
    ``write(f)`` fills the temporary file ``f``, opened for UTF-8 text, or for bytes if ``binary``."""
    with atomic_output(path, verify=verify, durable=durable, exclusive=exclusive) as tmp:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)


def write_json(path: str, obj, indent: int, sort_keys: bool = False, durable: bool = False,
               exclusive: bool = False) -> None:
    """Write ``obj`` as JSON and a final newline to ``path`` with :func:`write_file`."""
    write_file(path, lambda f: f.write(json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"),
               durable=durable, exclusive=exclusive)


def refuse_other_settings(recorded: dict, current: dict, recorded_in: str, problem: str, fix: str,
                          error: Type[UserError] = UserError) -> None:
    """Raise ``error`` when the settings a resumable run recorded when it started (``recorded``,
    read from ``recorded_in``) differ from this run's (``current``): its message is ``problem``,
    one line per differing key, then ``fix``.

    What a run resumes must have been made with the same settings: outputs made with others would
    be mixed into one result, silently.
    """
    differences = [
        f"  {key}: {recorded.get(key, '(unset)')!r} in {recorded_in}, {current.get(key, '(unset)')!r} now"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]
    if differences:
        raise error(f"{problem}:\n" + "\n".join(differences) + f"\n{fix}")


def disk_full_error(err: OSError, path: str) -> Optional[DiskFullError]:
    """The :class:`DiskFullError` for ``err`` raised while writing ``path``, or None when ``err`` is
    another error. For writers of several files at once, to name the one that did not fit."""
    if err.errno not in DISK_FULL_ERRNOS:
        return None
    error = DiskFullError(
        f"no space left on the device while writing {path}: nothing was lost (the files finished before "
        "are kept, this one was not written); free space on that file system and rerun the same command "
        "to continue"
    )
    error.__cause__ = err
    return error


def file_sha256(path: str) -> str:
    """Hex SHA-256 of the file at ``path``, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_files(teacher_path: str) -> List[dict]:
    """Each checkpoint of ``--teacher-path`` (``a.pt:b.pt``): absolute path, size and SHA-256.

    What a resumed run compares to know it still has the same teacher: a copied checkpoint (new
    modification time) is the same teacher, a retrained one written to the same path is not.
    """
    return [
        {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
        for path in split_teacher_paths(teacher_path)
    ]


def changed_teacher(recorded: List[dict], current: List[dict]) -> Optional[str]:
    """A sentence naming the first checkpoint whose contents differ between ``recorded`` and
    ``current`` (:func:`teacher_files` lists), or None when they are the same teachers."""
    if [t["sha256"] for t in recorded or []] == [t["sha256"] for t in current]:
        return None
    if len(recorded or []) != len(current):
        return (f"the ensemble has {len(current)} checkpoint(s) now, {len(recorded or [])} when this run "
                "was started")
    for before, now in zip(recorded, current):
        if before["sha256"] != now["sha256"]:
            return (f"teacher checkpoint {now['path']} is not the one this run was started with ({before['path']}, "
                    f"{before['bytes']} bytes, sha256 {before['sha256'][:12]}...; now {now['bytes']} bytes, "
                    f"sha256 {now['sha256'][:12]}...)")
    return None
