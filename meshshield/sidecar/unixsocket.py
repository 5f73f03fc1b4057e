"""A unix socket for local clients, in a directory only the sidecar can change.

Whoever may write a socket's directory may replace the socket with one of their own
and hand out identities in the sidecar's name, so the directory must be the sidecar's:
owned by its user, no symbolic link, writable by nobody else. A missing directory is
created with exactly those rights. Something already at the socket's path is removed
only if it is a socket (left by an earlier run); any other file is an error, never
deleted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from meshshield.errors import MeshError, Reason


def _refuse(path: Path, why: str) -> MeshError:
    return MeshError(Reason.FORBIDDEN, f"socket directory {path}: {why}")


def prepare_socket_path(path: Path, group: int | None = None) -> None:
    """Make `path`'s directory safe to hold the socket and clear a stale socket.

    With `group`, the directory is group-searchable (0750) and belongs to that group,
    so members can reach the socket; without, it is 0700. MeshError if the directory
    is not the sidecar's to use.
    """
    directory = path.parent
    mode = 0o750 if group is not None else 0o700
    try:
        directory.mkdir(mode=mode, parents=False)
        if group is not None:
            os.chown(directory, -1, group)
        os.chmod(directory, mode)  # mkdir's mode passes through the umask
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise _refuse(directory, "its parent directory does not exist") from None
    except PermissionError as e:
        raise _refuse(directory, f"cannot create it or give it to group {group}: "
                      f"{e.strerror}") from None
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(directory, "is a symbolic link, not a directory; name the real "
                      "directory")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(directory, "is not a directory")
    if st.st_uid != os.geteuid():
        raise _refuse(directory, f"belongs to uid {st.st_uid}, not to the sidecar's user "
                      f"{os.geteuid()}; use a directory the sidecar creates or owns")
    if st.st_mode & 0o022:
        raise _refuse(directory, f"is writable by {'others' if st.st_mode & 0o002 else 'its group'}"
                      f" (mode {stat.S_IMODE(st.st_mode):04o}); anyone who can write it could "
                      "replace the socket: chmod go-w it, or use a directory of its own")
    if group is not None and st.st_gid != group:
        raise _refuse(directory, f"belongs to group {st.st_gid}, not {group}: members of "
                      f"{group} could not reach the socket")
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise MeshError(Reason.CONFLICT, f"{path} is something other than a socket (it is "
                        "not a socket left by an earlier run), so it was not removed: move it "
                        "away or choose another socket path")
    if _served(path):
        raise MeshError(Reason.CONFLICT, f"{path} is served by another running process; "
                        "stop it or choose another socket path")
    path.unlink()


def _served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def secure_socket(path: Path, group: int | None = None) -> None:
    """Give a freshly bound socket its final rights: 0600, or 0660 for `group`."""
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files made meanwhile (a socket being bound) get no rights for anybody else."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def remove_socket(path: Path) -> None:
    """Remove our socket at shutdown (only a socket: never another file)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
