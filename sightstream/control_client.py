"""A client of a running daemon's control plane for the CLI commands (`status`, `summarize`):
plain urllib, JSON in and out, the daemon's error sentence raised as a SightstreamError."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from sightstream.errors import SightstreamError


class Unanswered(SightstreamError):
    """Nothing came back. `maybe_arrived`: the request may have reached the daemon (a timeout,
    a connection cut), as opposed to never leaving (refused, no such host)."""

    def __init__(self, message: str, maybe_arrived: bool) -> None:
        super().__init__(message)
        self.maybe_arrived = maybe_arrived


class ControlError(SightstreamError):
    """The control plane answered with an error; `status` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def call(base: str, path: str, token: str, method: str = "GET", body: Any = None,
         headers: dict[str, str] | None = None) -> Any:
    """The JSON answer of `method path`. Raises ControlError (an HTTP error, with the daemon's
    message) or SightstreamError (nothing answers)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["error"]["message"]
        except Exception:  # noqa: BLE001 - not our JSON error: say the status
            message = e.reason
        raise ControlError(f"{base}{path}: {e.code} {message}", e.code) from None
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        cut = isinstance(reason, (TimeoutError, ConnectionResetError, BrokenPipeError))
        raise Unanswered(f"no sightstream control plane answers at {base}: {e}", cut) from None
