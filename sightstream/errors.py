"""The error hierarchy. Only infrastructure errors escape a stage's run(); a frame's error
becomes a dead-letter entry with the error's `reason` code and message."""

from __future__ import annotations


class SightstreamError(Exception):
    """Base of every error sightstream raises on purpose."""


class ConfigError(SightstreamError):
    """A setting is invalid; start-up stops with this one line."""


class FrameError(SightstreamError):
    """This frame can never be processed (bad image, bad fields): dead-letter it at once."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelError(SightstreamError):
    """A model failed to load or to run."""


class ModelNotAvailable(ModelError):
    """A catalogue entry whose weights are not on this machine (never downloaded at run time)."""


class UnknownModel(ModelError):
    """No catalogue entry has this family/variant."""


class BatchSizeMismatch(ModelError):
    """An adapter returned a different number of results than images: a bug, never zipped."""
