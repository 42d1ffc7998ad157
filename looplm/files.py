"""Files and folders a reader sees whole or not at all: each is written into a sibling named
for the writing process and renamed into place when complete (a rename within a folder is
atomic on POSIX). Every package writes its outputs through these two functions; this module
imports nothing but the standard library, so the data pipelines may use it too."""

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(path: Path) -> Path:
    """A new sibling for ``path`` to be written into first: named for this host and process
    (so a stray one says whose it was) and for this write, so that two writers of the same
    file never write into each other's copy."""
    write = uuid.uuid4().hex[:8]
    return path.with_name(f"{path.name}.partial-{socket.gethostname()}-{os.getpid()}-{write}")


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path``, replacing what was there only once all of it is written."""
    path = Path(path)
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
    is made readable as the umask allows and renamed to ``path``: an older ``path`` is replaced,
    or, with ``replace=False``, kept (another process published the same contents first). On an
    error the folder is removed and ``path`` is untouched."""
    path = Path(path)
    partial = partial_path(path)
    partial.mkdir(parents=True)
    try:
        yield partial
        readable_as_umask_allows(partial)
        if path.exists() and replace:
            shutil.rmtree(path)
        try:
            os.rename(partial, path)
        except OSError:
            if replace or not path.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


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
