"""The files an API job may read: only those under `jobs.allowed_paths`. Checked when the job
is accepted (jobs/sources.py) and again on every file FFmpeg opens for it, on the file it
opened: a path checked once could be swapped for a link to a file elsewhere before a reopen,
and a playlist under an allowed folder could name segments anywhere on the disk."""

from __future__ import annotations

import io
import os
import stat
import threading
from collections.abc import Iterable
from typing import BinaryIO

from sightstream.errors import SightstreamError
from sightstream.stages.video_interrupt import guards

AVIO_FLAG_WRITE = 2  # libavformat's avio.h


class OutsideAllowedPaths(SightstreamError):
    """A file a job's source led to that is not under jobs.allowed_paths (or not a file)."""


def within(path: str, roots: Iterable[str]) -> bool:
    """Whether `path` (resolved) is one of `roots` (resolved) or under one."""
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


class ConfinedFiles:
    """An opener for PyAV's `io_open`, through which FFmpeg opens the input and every file it
    leads to: a regular file whose resolved path is under `roots`, and which is the very file
    that path names once opened (the same device and inode), or OutsideAllowedPaths. `close()`
    closes what it opened (FFmpeg leaves the input of a custom opener open). A hard link under
    an allowed folder to a file elsewhere is that file's own name there, and is read: making
    one needs write access to the folder and to be allowed to link the file."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self._roots = roots
        self._opened: list[BinaryIO] = []
        self._first_done = False  # the input itself opened: what follows are files it names

    def __call__(self, url: str, flags: int, options: dict) -> BinaryIO:
        self._opened = [f for f in self._opened if not f.closed]  # a live playlist's segments, read
        try:
            return self._open(url, flags)
        except OutsideAllowedPaths as e:
            # FFmpeg would go on to the next segment, and the next, each refused: stop it here
            if (guard := guards.get(threading.get_ident())) is not None:
                guard.fired = str(e)
            raise

    def _open(self, url: str, flags: int) -> BinaryIO:
        if flags & AVIO_FLAG_WRITE:
            raise OutsideAllowedPaths(f"{url}: a job's source is only read")
        path = url[len("file:"):] if url.startswith("file:") else url
        path = path[2:] if path.startswith("//") else path  # file:///x
        if "://" in path or not os.path.isabs(path):
            raise OutsideAllowedPaths(f"{url} is not a file under jobs.allowed_paths: a job's "
                                      "file may lead only to files there")
        if self._first_done and not os.path.lexists(path):
            # A playlist's segment that is missing: FFmpeg skips it when its own open fails, and
            # the reader says what was skipped; an exception here would end the read instead.
            return io.BytesIO(b"")
        self._first_done = True
        # O_NONBLOCK: a FIFO put in its place would block the open for ever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise OutsideAllowedPaths(f"{path} is not a file")
            real = os.path.realpath(path)
            now = os.stat(real)
            if not within(real, self._roots) or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
                raise OutsideAllowedPaths(f"{path} leads outside jobs.allowed_paths (to {real})")
            file = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        self._opened.append(file)
        return file

    def close(self) -> None:
        for file in self._opened:
            file.close()
        self._opened.clear()
