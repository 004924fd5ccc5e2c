"""`sightstream tail KEY`: a consumer that prints results (or dead-letters) as they arrive.

KEY may be a glob (`results:people:*`): matching streams are followed as they appear. Once
Redis has answered, losing it (a restart, a cluster failover) is waited out, with a line on
stderr when it goes and when it is back."""

from __future__ import annotations

import base64
import fnmatch
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError

from sightstream.redis_conn import OUTAGES, sync_client


def summarize(fields: dict[str, Any]) -> str:
    """One readable line for a result or dead-letter entry (its `result` as stored, or parsed).
    An entry of another shape (a glob can reach other writers' streams) is shown as it is."""
    try:
        return _summary(fields)
    except (TypeError, ValueError, AttributeError, KeyError):
        return f"(not a sightstream result) {json.dumps(fields, default=str)[:100]}"


def _summary(fields: dict[str, Any]) -> str:
    if "reason" in fields and "result" not in fields:
        return f"DEAD-LETTER {fields.get('reason')}: {fields.get('error')}"
    result = fields.get("result", "{}")
    try:
        result = json.loads(result) if isinstance(result, str) else result
    except ValueError:
        return f"(unreadable result) {fields.get('result', '')[:80]}"
    if not isinstance(result, dict):
        return f"(unreadable result) {json.dumps(result)[:80]}"
    if fields.get("task") == "summary":  # a job's summary (docs/http.md)
        final = "summary" if result.get("final") else "summary so far"
        return f"{final} of {result.get('lines', '?')} results: {result.get('text', '')!r}"
    latency = fields.get("latency_ms", "?")
    head = f"{fields.get('task', '?'):<7} {latency:>6} ms"
    if "detections" in result:
        dets = result["detections"]
        if not dets:
            return f"{head}  nothing detected"
        labels: dict[str, list[float]] = {}
        for d in dets:
            labels.setdefault(d.get("label", str(d.get("class_id"))), []).append(d.get("score", 0))
        parts = [
            f"{len(s)} x {label} ({', '.join(f'{v:.2f}' for v in sorted(s, reverse=True)[:3])})"
            for label, s in labels.items()
        ]
        return f"{head}  " + "; ".join(parts)
    if "text" in result:
        return f"{head}  {result['text']!r}"
    if isinstance(result.get("labels"), list):  # a classifier's best classes
        return f"{head}  " + ", ".join(f"{c.get('label')} ({float(c.get('score', 0)):.2f})"
                                       for c in result["labels"][:5])
    return f"{head}  {json.dumps(result)[:100]}"


def _decode(fields: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in fields.items():
        name = k.decode(errors="backslashreplace")  # a field name that is not UTF-8: shown escaped
        try:
            out[name] = v.decode()
        except UnicodeDecodeError:
            out[name] = {"base64": base64.b64encode(v).decode()}
    return out


JSON_FIELDS = ("result", "meta")  # JSON text in the entry: values of their own in --json


def _parsed(data: dict[str, Any]) -> dict[str, Any]:
    """An entry's fields for `--json`: `result` and `meta` as JSON values, not JSON in a
    string (`jq .result.detections` works); a field that is not valid JSON stays text."""
    out = dict(data)
    for name in JSON_FIELDS:
        if isinstance(out.get(name), str):
            try:
                out[name] = json.loads(out[name])
            except ValueError:
                pass
    return out


def tail(
    redis_url: str,
    key: str,
    *,
    start: str = "$",
    count: int = 0,
    timeout_s: float = 0,
    as_json: bool = False,
    emit: Callable[[str], None] = print,
    cluster: bool = False,
) -> int:
    """Follow KEY (or a glob of keys); returns how many entries it printed. Stops after
    `count` entries or `timeout_s` seconds without a new one (0: never); if Redis is away when
    that time runs out, raises its error instead (a quiet end would read as "no results")."""
    client = sync_client(redis_url, cluster=cluster, socket_timeout=10)
    is_glob = any(c in key for c in "*?[")

    def first_id(name: str, first_scan: bool) -> str:
        # "$" means "after what exists now": resolve it once, so nothing is missed between reads.
        # A stream that appears after tail started is read from its beginning.
        if start != "$" or not first_scan:
            return start if start != "$" else "0"
        info = client.xinfo_stream(name) if client.exists(name) else None
        return info["last-generated-id"].decode() if info else "0"

    # dict[Any, Any]: redis-py wants its own key types
    cursors: dict[Any, Any] = {} if is_glob else {key: first_id(key, True)}
    printed, last_new, last_scan, scans = 0, time.monotonic(), 0.0, 0
    reached, backoff_s = not is_glob, 0.0  # reached: Redis answered once (first_id asked it)
    try:
        while True:
            try:
                if is_glob and time.monotonic() - last_scan > 2:
                    for k in client.scan_iter(match=key, count=1000, _type="stream"):
                        name = k.decode(errors="replace")  # a name that is not UTF-8 is not followed
                        if name not in cursors and name.encode() == k and fnmatch.fnmatchcase(name, key):
                            cursors[name] = first_id(name, scans == 0)
                    last_scan, scans = time.monotonic(), scans + 1
                reply: Any = _read(client, cursors, cluster) if cursors else None
                reached = True
                if backoff_s:
                    print("sightstream: Redis is back; following again", file=sys.stderr, flush=True)
                    backoff_s = 0.0
                if not cursors:
                    time.sleep(0.5)
                for stream, entries in reply or ():
                    name = stream.decode()
                    for entry_id, fields in entries:
                        cursors[name] = entry_id.decode()
                        data = _decode(fields)
                        if as_json:
                            emit(json.dumps({"stream": name, "id": cursors[name], **_parsed(data)}))
                        else:
                            src = f"{name} " if is_glob else ""
                            emit(f"{src}{data.get('frame_id', cursors[name])}  {summarize(data)}")
                        printed += 1
                        last_new = time.monotonic()
                        if count and printed >= count:
                            return printed
            except OUTAGES as e:
                # A Redis restart or a cluster failover is waited out, as `tail -F` waits out a
                # rotated file; a URL that never answered is an error (the CLI says so, exit 1).
                if not reached:
                    raise
                if not backoff_s:
                    print(f"sightstream: Redis unreachable ({e or type(e).__name__}); waiting for it",
                          file=sys.stderr, flush=True)
                backoff_s = min(5.0, backoff_s * 2 or 0.5)
                time.sleep(backoff_s)
                if timeout_s and time.monotonic() - last_new > timeout_s:  # not a quiet end: exit 1
                    raise ConnectionError(f"Redis still unreachable when --timeout ({timeout_s:g} s) "
                                          f"ran out: {e}") from None
            if timeout_s and time.monotonic() - last_new > timeout_s:
                return printed
    finally:  # Ctrl-C goes on to the CLI: exit 130, as the contract says
        client.close()
        sys.stdout.flush()


def _read(client: Any, cursors: dict[Any, Any], cluster: bool) -> list:
    """XREAD of every followed stream; on a cluster one read per slot (a read cannot span
    slots), polled every 0.2 s rather than blocked on."""
    if not cluster:
        return client.xread(cursors, block=1000, count=100) or []
    from redis.crc import key_slot

    by_slot: dict[int, dict[Any, Any]] = {}
    for name, cursor in cursors.items():
        by_slot.setdefault(key_slot(name.encode()), {})[name] = cursor
    replies = [r for group in by_slot.values() for r in client.xread(group, count=100) or []]
    if not replies:
        time.sleep(0.2)
    return replies
