"""Directories that appear whole or not at all: written beside their final place, then renamed
into it. A failure (or Ctrl-C, or SIGTERM) while writing removes what was written and leaves
whatever was at the final place untouched."""
from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import threading
from pathlib import Path


@contextlib.contextmanager
def staged_directory(path):
    """Yield a new hidden directory beside ``path`` to write into; when the block ends without
    an exception it replaces ``path`` (an existing one is renamed aside first and removed after,
    so no moment leaves neither the old nor the new directory on disk). Only a directory is
    replaced: anything else at ``path`` is a FileExistsError before anything is written."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} exists and is not a directory; not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_raises():
        tmp = _new_hidden_directory(path)
        try:
            yield tmp
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                try:
                    tmp.rename(path)
                except BaseException:
                    old.rename(path)  # the old directory back where it was
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _new_hidden_directory(path: Path) -> Path:
    """A new directory ``.<name>.<random>`` beside ``path``, with the permissions the umask
    gives any directory (tempfile.mkdtemp's 0700 would stay on the renamed result)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM raises SystemExit (as SIGINT raises KeyboardInterrupt),
    so that the cleanup runs before the process ends; the previous handler is back after.

    Left alone where it cannot or must not change: outside the main thread, and where a
    handler other than the default one is installed (its owner decides what SIGTERM does)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
