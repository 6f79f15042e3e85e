"""Directories that appear whole or not at all: written beside their final place, then renamed
into it. A failure (or Ctrl-C) while writing removes what was written and leaves whatever was at
the final place untouched."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def staged_directory(path):
    """Yield a new hidden directory beside ``path`` to write into; when the block ends without
    an exception it replaces ``path`` (an existing one is renamed aside first and removed after,
    so no moment leaves neither the old nor the new directory on disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
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
