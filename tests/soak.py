"""The soak: real daemons, a real redis-server and every fault at once, for minutes, then one
table of what happened to every frame. `make soak` (5 minutes; `make soak SOAK_S=60` for less).

Three `sightstream run` processes share two pipelines on one redis-server:
- `steady` reads `frames:{c0..c3}`: every frame must end with exactly one result or one
  dead-letter entry. About 15 % of its frames are malformed, in 10 kinds, each with the
  dead-letter reason it must get.
- `live` reads `live:{l0,l1}` in live mode (`max_age_ms`): frames too old when dequeued are
  acknowledged with no result, so it is judged on doubles, pending and latency.
The model is the scripted test adapter: a fixed time per batch that releases the GIL, as a GPU
call does, so the daemons' capacity is known (`--batch-s`, batch size 4).

Faults, on a schedule: daemon d0 is killed with SIGKILL every 10 s and started again (d1 and d2
live through the whole run, so their memory is what is measured); Redis is restarted with its
AOF (nothing may be lost) at 30 % of the run and without persistence (its data are gone: the
frames it held are counted apart, as wiped) at 75 %; from 45 % to 60 % the live streams get ten
times what the daemons can do.

Goals (exit 1 if one is missed): 0 lost, 0 doubled, 0 pending at the end, every malformed
frame dead-lettered with its reason, and the RSS of d1 and d2 at the end within ±5 % of what it
was after warm-up.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import redis
from PIL import Image

from sightstream.daemon.embedded_redis import EmbeddedRedis, free_port
from tests.e2e.daemons import Daemon, wait_until

STEADY = [f"frames:{{c{i}}}" for i in range(4)]
LIVE = [f"live:{{l{i}}}" for i in range(2)]
BATCH = 4
MAX_AGE_MS = 1500


def jpeg(seed: int, size: tuple[int, int] = (96, 64)) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out, "JPEG", quality=70)
    return out.getvalue()


def png_bomb() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


GOOD = jpeg(1)
# Ten kinds of malformed frame, each with the dead-letter reason the contract gives it.
MALFORMED: dict[str, tuple[dict[str, bytes | str], str]] = {
    "truncated_jpeg": ({"image": GOOD[: len(GOOD) // 2]}, "bad_image"),
    "random_bytes": ({"image": b"\x00\x13garbage" * 20}, "unsupported_format"),
    "empty_image": ({"image": b""}, "unsupported_format"),
    "no_image": ({"camera": "front"}, "missing_image"),
    "raw_wrong_size": ({"raw": b"\x00" * 10, "width": "4", "height": "4", "pix_fmt": "rgb24"}, "bad_raw"),
    "raw_bad_pix_fmt": ({"raw": b"\x00" * 48, "width": "4", "height": "4", "pix_fmt": "yuv9"}, "bad_raw"),
    "raw_no_width": ({"raw": b"\x00" * 48, "height": "4", "pix_fmt": "rgb24"}, "bad_raw"),
    "png_bomb": ({"image": png_bomb()}, "too_large"),
    "bad_ts": ({"image": GOOD, "ts": "yesterday"}, "bad_fields"),
    "bad_meta": ({"image": GOOD, "meta": "[1]"}, "bad_fields"),
}


def config(redis_url: str, batch_s: float) -> str:
    return f"""
redis_url = "{redis_url}"
devices = ["cpu"]
reclaim_min_idle_ms = 2000
shutdown_timeout_s = 5
log_format = "json"
log_level = "warning"

[control]
port = {{port}}

[[pipelines]]
name = "steady"
input = ["frames:*"]
model = "fake/model"
batch_size = {BATCH}
max_in_flight = 16

[[pipelines]]
name = "live"
input = ["live:*"]
model = "fake/model"
batch_size = {BATCH}
max_in_flight = 16
max_age_ms = {MAX_AGE_MS}

[models.fake.model]
backend = "torch"
task = "detect"
adapter = "tests.fake_adapters:Scripted"
delay_s = {batch_s}
"""


@dataclass
class Ledger:
    """Every frame the soak published, and every outcome it has read back."""

    sent: dict[tuple[str, str], str] = field(default_factory=dict)  # (stream, id) -> kind
    outcomes: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    latency_ms: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    wiped: set[tuple[str, str]] = field(default_factory=set)  # held by Redis when it lost its data
    lock: threading.Lock = field(default_factory=threading.Lock)


class Producer(threading.Thread):
    """XADDs frames at `rate()` per second, round-robin over `streams`; a round refused while
    Redis is down is skipped (those frames were never published)."""

    def __init__(self, url: str, streams: list[str], rate, ledger: Ledger, malformed: float,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.streams, self.rate = url, streams, rate
        self.ledger, self.malformed, self.stop = ledger, malformed, stop
        self.rng = random.Random(7)

    def run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        owed, last, n = 0.0, time.monotonic(), 0
        while not self.stop.is_set():
            now = time.monotonic()
            owed += (now - last) * self.rate()
            last = now
            batch = []
            while owed >= 1:
                owed -= 1
                stream = self.streams[n % len(self.streams)]
                n += 1
                kind = "good"
                fields: dict = {"image": GOOD}
                if self.rng.random() < self.malformed:
                    kind = self.rng.choice(list(MALFORMED))
                    fields = dict(MALFORMED[kind][0])
                fields.setdefault("ts", str(time.time_ns() // 1_000_000))
                batch.append((stream, kind, fields))
            if batch:
                # Written and recorded under the lock: Redis cannot lose its data in between.
                with self.ledger.lock:
                    try:
                        pipe = client.pipeline(transaction=False)
                        for stream, _, fields in batch:
                            pipe.xadd(stream, fields)
                        ids = pipe.execute()
                    except redis.RedisError:
                        ids = []
                    for (stream, kind, _), entry_id in zip(batch, ids):
                        self.ledger.sent[(stream, entry_id.decode())] = kind
                if not ids:
                    time.sleep(0.2)
            time.sleep(0.02)
        client.close()


class Tailer(threading.Thread):
    """Reads every result and dead-letter stream from the start (plain XREAD: it takes nothing
    from the daemons' groups) into the ledger. Each read is recorded under the ledger's lock in
    the same step, so `read_once` from another thread (before Redis loses its data) neither
    misses nor repeats an entry."""

    def __init__(self, url: str, ledger: Ledger, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.ledger, self.stop = url, ledger, stop
        self.keys = ([f"results:steady:{s}" for s in STEADY] + [f"deadletter:steady:{s}" for s in STEADY]
                     + [f"results:live:{s}" for s in LIVE] + [f"deadletter:live:{s}" for s in LIVE])
        self.last = dict.fromkeys(self.keys, "0-0")

    def restart_from_zero(self) -> None:
        """Redis lost its data: the streams start again, empty."""
        self.last = dict.fromkeys(self.keys, "0-0")

    def read_once(self, client: redis.Redis) -> int:
        """Read and record what is new; the caller holds the ledger's lock."""
        read = 0
        for key, entries in client.xread(self.last, count=5000):
            key = key.decode()
            for entry_id, fields in entries:
                read += 1
                self.last[key] = entry_id.decode()
                source = fields[b"source"].decode()
                frame = fields[b"frame_id"].decode()
                outcome = fields[b"reason"].decode() if key.startswith("deadletter:") else "result"
                self.ledger.outcomes[(source, frame)].append(outcome)
                if outcome == "result":
                    self.ledger.latency_ms[key.split(":")[1]].append(int(fields[b"latency_ms"]))
        return read

    def run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        while not self.stop.is_set():
            try:
                with self.ledger.lock:
                    read = self.read_once(client)
            except redis.RedisError:
                read = 0
            if not read:
                time.sleep(0.1)
        client.close()


def unacknowledged(client: redis.Redis) -> set[tuple[str, str]]:
    """The entries Redis still holds for a group: pending, or not yet delivered. When Redis loses
    its data these are gone with it (a frame already acknowledged is not: it has its outcome, or
    was dropped as stale by live mode)."""
    held: set[tuple[str, str]] = set()
    for group, streams in (("steady", STEADY), ("live", LIVE)):
        for stream in streams:
            try:
                info = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
            except redis.ResponseError:
                continue
            last = info[group]["last-delivered-id"].decode() if group in info else "0-0"
            held |= {(stream, i.decode()) for i, _ in client.xrange(stream, f"({last}", "+")}
            rows = client.xpending_range(stream, group, "-", "+", 1_000_000) if group in info else []
            held |= {(stream, r["message_id"].decode()) for r in rows}
    return held


def rss_mb(d: Daemon) -> float:
    try:
        return psutil.Process(d.proc.pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def p99(values: list[int]) -> int | None:
    return sorted(values)[int(0.99 * (len(values) - 1))] if values else None


def rss_median_mb(d: Daemon, samples: int = 3) -> float:
    """The median of a few samples a second apart: one sample can catch a passing peak."""
    values = []
    for i in range(samples):
        values.append(rss_mb(d))
        if i < samples - 1:
            time.sleep(1)
    return float(np.median(values))


def soak(seconds: float, batch_s: float, workdir: Path, log=print) -> dict:
    capacity = 3 * BATCH / batch_s  # frames/s that three daemons' models can take
    steady_rate, live_rate = 0.3 * capacity, 0.1 * capacity
    port = free_port()
    server = EmbeddedRedis(port=port, appendonly=True).start()
    url = server.url
    ledger, producing, stop = Ledger(), threading.Event(), threading.Event()
    start = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - start

    overload = (0.45 * seconds, 0.60 * seconds)

    def live_now() -> float:
        return 10 * capacity if overload[0] <= elapsed() < overload[1] else live_rate

    text = config(url, batch_s)
    daemons: list[Daemon] = []
    threads: list[threading.Thread] = []
    facts: dict = {"kills": 0, "kills_with_frames_in_flight": 0, "restarts": [], "unexpected_exits": [],
                   "rss": {}, "overload_fps": None}
    rss = facts["rss"]
    try:
        daemons = [Daemon(workdir, url, name=f"d{i}", text=text) for i in range(3)]
        for i, d in enumerate(daemons):
            d.wait_ready(120)
            rss[f"d{i}"] = {"at_ready": round(rss_mb(d), 1)}
        producers = [Producer(url, STEADY, lambda: steady_rate, ledger, 0.15, producing),
                     Producer(url, LIVE, live_now, ledger, 0.0, producing)]
        tailer = Tailer(url, ledger, stop)
        threads = [*producers, tailer]
        for thread in threads:
            thread.start()
        start = time.monotonic()
        warm_s = min(60.0, 0.2 * seconds)
        next_kill, next_report = 10.0, 30.0
        aof_done = wipe_done = False
        live_sent_at: dict[str, int] = {}
        log(f"soak: {seconds:.0f} s, capacity ~{capacity:.0f} frames/s, steady {steady_rate:.0f}/s "
            f"(15 % malformed), live {live_rate:.0f}/s, overload {10 * capacity:.0f}/s "
            f"from {overload[0]:.0f} s to {overload[1]:.0f} s")
        while elapsed() < seconds:
            time.sleep(0.2)
            t = elapsed()
            for i, d in enumerate(daemons):
                if d.proc.poll() is not None and (i, d.proc.pid) not in facts["unexpected_exits"]:
                    facts["unexpected_exits"].append((i, d.proc.pid))
                    log(f"{t:5.0f} s: d{i} exited by itself (code {d.proc.returncode}): see {d.log.name}")
            if t >= next_kill:
                next_kill += 10
                if in_flight_on(url, daemons[0]):
                    facts["kills_with_frames_in_flight"] += 1
                daemons[0].close()  # SIGKILL
                facts["kills"] += 1
                daemons[0] = Daemon(workdir, url, name=f"d0-{facts['kills']}", text=text)
            for mark, at in (("start", overload[0]), ("end", overload[1])):
                if mark not in live_sent_at and t >= at:
                    with ledger.lock:
                        live_sent_at[mark] = sum(1 for k in ledger.sent if k[0] in LIVE)
                    if mark == "end":
                        facts["overload_fps"] = round((live_sent_at["end"] - live_sent_at["start"])
                                                      / (overload[1] - overload[0]))
            if not aof_done and t >= 0.30 * seconds:
                aof_done = True
                log(f"{t:5.0f} s: Redis restarted (AOF on, a clean SIGTERM)")
                server.stop()
                time.sleep(1)
                server.start()
                facts["restarts"].append("aof")
            if not wipe_done and t >= 0.75 * seconds:
                wipe_done = True
                log(f"{t:5.0f} s: Redis restarted without persistence")
                with ledger.lock:  # producers and the tailer wait: nothing happens unseen
                    client = redis.Redis.from_url(url)
                    ledger.wiped = unacknowledged(client)
                    tailer.read_once(client)  # results written up to now are not lost with Redis
                    client.close()
                    server.close()
                    time.sleep(1)
                    server = EmbeddedRedis(port=port, appendonly=False).start()
                    tailer.restart_from_zero()
                facts["restarts"].append("none")
            if t >= warm_s and "after_warm_up" not in rss["d1"]:
                for i in (1, 2):
                    rss[f"d{i}"]["after_warm_up"] = round(rss_median_mb(daemons[i]), 1)
            if t >= next_report:
                next_report += 30
                with ledger.lock:
                    log(f"{t:5.0f} s: published {len(ledger.sent)}, outcomes {len(ledger.outcomes)}, "
                        f"d0 killed {facts['kills']} times, RSS d1 {rss_mb(daemons[1]):.0f} MB "
                        f"d2 {rss_mb(daemons[2]):.0f} MB")
        producing.set()
        for p in producers:
            p.join()
        log(f"{elapsed():5.0f} s: producers stopped; draining")
        client = redis.Redis.from_url(url)

        def settled() -> bool:
            with ledger.lock:
                waiting = [k for k in ledger.sent
                           if k[0] in STEADY and k not in ledger.outcomes and k not in ledger.wiped]
            return not waiting and not unacknowledged(client)

        try:
            wait_until(settled, max(120.0, seconds), "every frame's outcome")
        except AssertionError as e:
            log(f"not settled: {e}")
        time.sleep(2)  # anything doubled late would show now
        for i in (1, 2):
            rss[f"d{i}"]["end"] = round(rss_median_mb(daemons[i]), 1)
        facts["left_in_redis"] = len(unacknowledged(client))
        facts["pending_at_end"] = pending(client)
        client.close()
    finally:
        producing.set()
        stop.set()
        for thread in threads:
            thread.join(10)
        for d in daemons:
            d.close()
        server.close()
    return report(ledger, facts, seconds, capacity)


def pending(client: redis.Redis) -> int:
    total = 0
    for group, streams in (("steady", STEADY), ("live", LIVE)):
        for stream in streams:
            try:
                total += client.xpending(stream, group)["pending"]
            except redis.ResponseError:
                pass
    return total


def in_flight_on(url: str, d: Daemon) -> bool:
    """Whether the daemon holds frames now (pending under its consumer name)."""
    try:
        status, health = d.get("/health")
        consumer = health.get("consumer")
    except OSError:
        return False
    client = redis.Redis.from_url(url)
    try:
        for group, streams in (("steady", STEADY), ("live", LIVE)):
            for stream in streams:
                try:
                    if client.xpending_range(stream, group, "-", "+", 1, consumername=consumer):
                        return True
                except redis.ResponseError:
                    pass
        return False
    finally:
        client.close()


def report(ledger: Ledger, facts: dict, seconds: float, capacity: float) -> dict:
    out: dict = {"seconds": seconds, "capacity_fps": round(capacity), "overload_fps": facts["overload_fps"],
                 "d0_killed": facts["kills"], "d0_killed_holding_frames": facts["kills_with_frames_in_flight"],
                 "unexpected_exits": facts["unexpected_exits"], "redis_restarts": facts["restarts"],
                 "pipelines": {}, "rss_mb": {}}
    for pipeline, streams in (("steady", STEADY), ("live", LIVE)):
        sent = {k: kind for k, kind in ledger.sent.items() if k[0] in streams}
        outcomes = {k: v for k, v in ledger.outcomes.items() if k[0] in streams}
        counted = Counter()
        wrong_reason = []
        for k, kind in sent.items():
            got = outcomes.get(k, [])
            if len(got) > 1:
                counted["doubled"] += 1
            if not got:
                counted["wiped" if k in ledger.wiped else "no_outcome"] += 1
                continue
            counted["results" if got[0] == "result" else "dead_letters"] += 1
            expected = MALFORMED[kind][1] if kind in MALFORMED else "result"
            if got[0] == "max_deliveries" and kind == "good":
                counted["good_dead_lettered"] += 1  # in flight on d0 through too many kills
            elif got[0] != expected:
                wrong_reason.append((kind, got[0]))
        unknown = [k for k in outcomes if k not in sent]  # an XADD whose reply was lost
        row = {
            "published": len(sent),
            "malformed": sum(1 for kind in sent.values() if kind != "good"),
            "results": counted["results"],
            "dead_letters": counted["dead_letters"],
            "wrong_reason": len(wrong_reason),  # a malformed frame's result, or another reason
            "good_dead_lettered_max_deliveries": counted["good_dead_lettered"],
            "doubled": counted["doubled"],
            "wiped_with_redis": counted["wiped"],
            "p99_latency_ms": p99(ledger.latency_ms[pipeline]),
            "outcomes_for_unrecorded_frames": len(unknown),
        }
        if pipeline == "steady":
            row["lost"] = counted["no_outcome"]
        else:  # live mode drops stale frames with no outcome by design: not told apart from a loss
            row["acked_without_result"] = counted["no_outcome"]
        if wrong_reason:
            row["wrong_reason_examples"] = Counter(wrong_reason).most_common(5)
        out["pipelines"][pipeline] = row
    out["pending_at_end"] = facts.get("pending_at_end")
    out["left_in_redis"] = facts.get("left_in_redis")  # pending or never delivered
    for name, r in facts["rss"].items():
        row = dict(r)
        if "after_warm_up" in r and "end" in r:
            row["change_pct"] = round(100 * (r["end"] - r["after_warm_up"]) / r["after_warm_up"], 1)
        out["rss_mb"][name] = row
    steady = out["pipelines"]["steady"]
    out["goals_met"] = (steady["lost"] == 0 and steady["doubled"] == 0 and steady["wrong_reason"] == 0
                        and out["pipelines"]["live"]["doubled"] == 0 and out["left_in_redis"] == 0
                        and not out["unexpected_exits"]
                        and all(abs(r.get("change_pct", 100)) <= 5 for n, r in out["rss_mb"].items() if n != "d0"))
    return out


def table(r: dict) -> str:
    s, live = r["pipelines"]["steady"], r["pipelines"]["live"]
    rows = [
        ("frames published", s["published"], live["published"]),
        ("  of them malformed (10 kinds)", s["malformed"], live["malformed"]),
        ("results", s["results"], live["results"]),
        ("dead-letters", s["dead_letters"], live["dead_letters"]),
        ("outcomes not the expected one (a malformed frame's result, a wrong reason)", s["wrong_reason"],
         live["wrong_reason"]),
        ("good frames dead-lettered `max_deliveries` (in flight through too many kills)",
         s["good_dead_lettered_max_deliveries"], live["good_dead_lettered_max_deliveries"]),
        ("lost", s["lost"], f"not told apart: {live['acked_without_result']} acknowledged with no "
         "result, live mode's stale drops (loss is measured on steady)"),
        ("doubled", s["doubled"], live["doubled"]),
        ("wiped with Redis (restart without persistence)", s["wiped_with_redis"], live["wiped_with_redis"]),
        ("p99 latency, capture to result (ms)", s["p99_latency_ms"], live["p99_latency_ms"]),
    ]
    lines = ["| | steady | live |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append(f"| pending at the end / left in Redis unacknowledged | {r['pending_at_end']} / "
                 f"{r['left_in_redis']} (both pipelines) | |")
    for name, m in r["rss_mb"].items():
        if "end" in m:
            lines.append(f"| RSS of {name} (MB): at ready, after warm-up → end | {m['at_ready']}, "
                         f"{m['after_warm_up']} → {m['end']} ({m['change_pct']:+.1f} %) | |")
        else:
            lines.append(f"| RSS of {name} (MB) at ready (first life; killed every 10 s) | {m['at_ready']} | |")
    lines.append(f"| faults | d0 killed -9 {r['d0_killed']} times ({r['d0_killed_holding_frames']} while "
                 f"holding frames); Redis restarted: {', '.join(r['redis_restarts'])}; live overload "
                 f"{r['overload_fps']} frames/s (capacity {r['capacity_fps']}) | |")
    if r["unexpected_exits"]:
        lines.append(f"| daemons that exited by themselves | {r['unexpected_exits']} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300, help="how long to run the faults (default 300)")
    ap.add_argument("--batch-s", type=float, default=0.2, help="the model's time per batch of 4 (default 0.2)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sightstream-soak-"))
    try:
        result = soak(args.seconds, args.batch_s, workdir)
    finally:
        print(f"daemon logs: {workdir}")
    print(table(result))
    print("goals met" if result["goals_met"] else "GOALS MISSED")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if result["goals_met"]:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
