"""The files an API job may read: only those under `jobs.allowed_paths`. Checked when the job
is accepted (jobs/sources.py) and again on every file FFmpeg opens for it, on the file it
opened: a path checked once could be swapped for a link to a file elsewhere before a reopen,
and a playlist under an allowed folder could name segments anywhere on the disk."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import BinaryIO

from sightstream.errors import SightstreamError

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
    closes what it opened (FFmpeg leaves the input of a custom opener open)."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self._roots = roots
        self._opened: list[BinaryIO] = []

    def __call__(self, url: str, flags: int, options: dict) -> BinaryIO:
        if flags & AVIO_FLAG_WRITE:
            raise OutsideAllowedPaths(f"{url}: a job's source is only read")
        path = url[len("file:"):] if url.startswith("file:") else url
        path = path[2:] if path.startswith("//") else path  # file:///x
        if "://" in path or not os.path.isabs(path):
            raise OutsideAllowedPaths(f"{url} is not a file under jobs.allowed_paths: a job's "
                                      "file may lead only to files there")
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
