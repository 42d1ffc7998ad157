"""Files and folders a reader sees whole or not at all: each is written into a sibling named
for the writing process and renamed into place when complete (a rename within a folder is
atomic on POSIX). The model, export, gate, data-cache and metrics outputs go through these
two functions; the run checkpoints keep their own protocol (``train/checkpointing.py``: fsync,
manifest, ``COMPLETE`` marker) and a pre-tokenized shard streams into its ``.partial`` file.
This module imports nothing but the standard library, so the data pipelines may use it too."""

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial-"
"""What a partial sibling's name holds after the name of what it becomes."""


def partial_path(path: Path) -> Path:
    """A new sibling for ``path`` to be written into first: named for this host and process
    (so a stray one says whose it was) and for this write, so that two writers of the same
    file never write into each other's copy."""
    write = uuid.uuid4().hex[:8]
    return path.with_name(f"{path.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}-{write}")


def remove_stale_partials(path: Path) -> None:
    """Removes the partial siblings of ``path`` that a process of this host left when it was
    killed mid-write (its process is gone); those of live processes, or of other hosts, stay."""
    prefix = f"{path.name}{PARTIAL}{socket.gethostname()}-"
    for stray in path.parent.glob(f"{path.name}{PARTIAL}*"):
        pid = stray.name[len(prefix) :].split("-")[0]
        if stray.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            if stray.is_dir():
                shutil.rmtree(stray, ignore_errors=True)
            else:
                stray.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path``, replacing what was there only once all of it is written."""
    path = Path(path)
    remove_stale_partials(path)
    partial = partial_path(path)
    try:
        with open(partial, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextmanager
def publishing(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yields an empty folder to write ``path``'s contents into. When the block ends, the folder
    is made readable as the umask allows and renamed to ``path``. An older ``path`` is renamed
    aside first and removed once the new one is in place, or, with ``replace=False``, kept
    (another process published the same contents first). On an error in the block the folder
    is removed and ``path`` is untouched; if the final rename fails, the old ``path`` is put
    back and the complete new copy is left in its partial folder, named in the error."""
    path = Path(path)
    remove_stale_partials(path)
    partial = partial_path(path)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    readable_as_umask_allows(partial)
    if not replace and path.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        return
    old = None
    if path.exists():
        old = partial.with_name(partial.name + ".replaced")
        os.rename(path, old)
    try:
        os.rename(partial, path)
    except OSError as error:
        if old is not None:
            os.rename(old, path)
        if not replace and path.is_dir():  # published by another process meanwhile
            shutil.rmtree(partial, ignore_errors=True)
            return
        raise OSError(f"{path} could not be put in place; the new copy is in {partial}") from error
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def readable_as_umask_allows(directory: Path) -> None:
    """Gives the directory and every file in it the modes a plain ``open`` or ``mkdir`` would
    (0666 / 0777 less the umask): some writers (safetensors) create files 0600, which the
    rest of a cluster group then cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, folders, files in os.walk(directory):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
