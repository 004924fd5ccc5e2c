"""The `sightstream` command. Heavy modules are imported inside each command, so --help is fast."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from redis.exceptions import MovedError, RedisClusterException, RedisError, ResponseError

from sightstream import __version__
from sightstream.errors import ConfigError, SightstreamError


def _settings(args: argparse.Namespace):
    from sightstream.config import load_settings

    return load_settings(getattr(args, "config", None))


def _redis_url(args: argparse.Namespace) -> str:
    return args.redis_url or _settings(args).redis_url


def _redis_cluster(args: argparse.Namespace) -> bool:
    """With --redis-url the config file is not read (it may not exist on this host): then
    SIGHTSTREAM_REDIS_CLUSTER=true says it is a cluster."""
    if args.redis_url:
        return os.environ.get("SIGHTSTREAM_REDIS_CLUSTER", "").lower() in ("1", "true", "yes")
    return _settings(args).redis_cluster


def cmd_run(args: argparse.Namespace) -> int:
    from sightstream import log
    from sightstream.service import leave_running_calls, serve

    settings = _settings(args)
    log.configure(settings.log_level, settings.log_format)
    code = asyncio.run(serve(settings))
    leave_running_calls(code)
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from sightstream import log
    from sightstream.demo import run_demo

    settings = _settings(args)
    log.configure("warning", settings.log_format)  # the demo's own lines are the output
    return asyncio.run(run_demo(settings, seconds=args.seconds, say=lambda s: print(s, flush=True),
                                keep=args.keep))


def cmd_publish(args: argparse.Namespace) -> int:
    from sightstream.publish import publish

    sent = publish(
        _redis_url(args), args.source, args.stream, fps=args.fps, loop=args.loop,
        maxlen=args.maxlen, quality=args.quality, max_frames=args.max_frames,
        progress=not args.quiet, cluster=_redis_cluster(args), timeout_s=args.timeout,
    )
    if not args.quiet:
        print(f"published {sent} frame{'' if sent == 1 else 's'} to {args.stream}", file=sys.stderr)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from sightstream.tail import tail

    tail(_redis_url(args), args.key, start=args.start, count=args.count, timeout_s=args.timeout,
         as_json=args.json, emit=lambda s: print(s, flush=True), cluster=_redis_cluster(args))
    return 0


# built in; a daemon without its weights says how to put them in its cache
DEFAULT_SUMMARY_MODEL = "qwen2_5/0.5b-instruct"
TOKEN_HELP = "default: the config's control.token; with --url, $SIGHTSTREAM_CONTROL__TOKEN"


def _control(args: argparse.Namespace) -> tuple[str, str]:
    """The control plane's base URL and token: --url and --token, else the config's."""
    if args.url:
        url = args.url if "://" in args.url else f"http://{args.url}"  # host:port, as one types it
        return url, args.token or os.environ.get("SIGHTSTREAM_CONTROL__TOKEN", "")
    control = _settings(args).control
    host = "127.0.0.1" if control.host in ("0.0.0.0", "::", "") else control.host
    return f"http://{host}:{control.port}", args.token or control.token


def cmd_status(args: argparse.Namespace) -> int:
    from sightstream.status import status

    base, token = _control(args)
    return status(base, token, as_json=args.json)


def cmd_summarize(args: argparse.Namespace) -> int:
    from sightstream.summarize import summarize

    base, token = _control(args)
    return summarize(base, token, args.video, args.model, args.summary_model, prompt=args.prompt,
                     summary_prompt=args.summary_prompt, fps=args.fps, max_frames=args.max_frames,
                     max_seconds=args.max_seconds, every_s=args.every, progress=not args.quiet,
                     as_json=args.json, emit=lambda s: print(s, flush=True))


def cmd_models(args: argparse.Namespace) -> int:
    from sightstream.models.catalogue import Catalogue

    entries = [e.describe() for e in Catalogue(_settings(args).models)]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    print(f"{'MODEL':<24} {'TASK':<8} {'BACKEND':<13} {'OFFLINE':<8} DESCRIPTION")
    for e in entries:
        print(f"{e['model']:<24} {e['task']:<8} {e['backend']:<13} "
              f"{'yes' if e['available'] else 'no':<8} {e['description']}")
        if e["licence"]:
            print(f"{'':<24} licence: {e['licence']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sightstream.bench import main as bench_main
    from sightstream.daemon.devices import resolve

    args.models = _settings(args).models  # a --config's model entries can be benchmarked
    resolve([args.device, *(d.strip() for d in args.devices.split(",") if d.strip())])  # GPUs there are
    return bench_main(args)


def _number(parse: Callable[[str], Any], ok: Callable[[Any], bool], says: str) -> Callable[[str], Any]:
    """An argument type: `parse` the text (int or float), then check it; either failing is
    argparse's exit 2 with a sentence naming the option ("--count: -1 is negative")."""
    kind = "a whole number" if parse is int else "a number"

    def check(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} {says}")
        return value

    return check


_positive = _number(int, lambda v: v >= 1, "is not a positive number")
_count = _number(int, lambda v: v >= 0, "is negative")
_quality = _number(int, lambda v: 1 <= v <= 100, "is not a JPEG quality (1 to 100)")
_seconds = _number(float, lambda v: 0 < v < math.inf, "is not a positive number of seconds")
_period = _number(float, lambda v: 1 <= v < math.inf, "is not a number of seconds of at least 1")
_rate = _number(float, lambda v: 0 <= v < math.inf, "is not a rate (0 or more per second)")
_idle = _number(float, lambda v: 0 <= v < math.inf, "is not a number of seconds (0 or more)")
_millis = _number(float, lambda v: 0 <= v < math.inf, "is not a number of milliseconds (0 or more)")


def _a_redis_url(text: str) -> str:
    from sightstream.config import check_redis_url
    from sightstream.redis_conn import safe_url

    try:
        return check_redis_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{safe_url(text)!r} is not a Redis URL (redis://host:port/db, "
                                         f"rediss://… or unix://…): it {e}") from None


def _entry_id(text: str) -> str:
    if text not in ("$", "0") and not re.fullmatch(r"\d+(-\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a stream entry ID (e.g. 1700000000000-0; 0: from "
                                         "the start; $: new entries)")
    return text


def _frame_size(text: str) -> str:
    if not (m := re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())) or not (
            1 <= int(m[1]) <= 16384 and 1 <= int(m[2]) <= 16384):
        raise argparse.ArgumentTypeError(f"{text!r} is not a frame size WxH (e.g. 1280x720)")
    return text


def _batch_sizes(text: str) -> str:
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and 1 <= int(p) <= 1024 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of batch sizes, 1 to 1024 (e.g. 1,8,32)")
    return text


def _key(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a stream key cannot be empty")
    return text


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="sightstream",
        description="Run vision models on live video over Redis Streams.",
    )
    top.add_argument("--version", action="version", version=f"sightstream {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE",
                       help="TOML settings (default: /etc/sightstream/sightstream.toml if present)")

    p = sub.add_parser("run", help="run the daemon for the configured pipelines")
    config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="everything on this machine: Redis, daemon, a sample video, results")
    config(p)
    p.add_argument("--seconds", type=_period, default=6.0, help="length of the sample video (at least 1)")
    p.add_argument("--keep", action="store_true",
                   help="after the summary, keep the daemon up and the video going round (to look at the "
                        "live page) until Ctrl-C")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("publish", help="publish frames of a video, URL, image or folder of images")
    config(p)
    p.add_argument("source", metavar="VIDEO|DIR|URL",
                   help="a video file, a video URL (http(s), HLS, rtsp), a folder of images, or one image")
    p.add_argument("--stream", required=True, type=_key, metavar="KEY", help="e.g. frames:{cam1}")
    p.add_argument("--fps", type=_rate, default=None,
                   help="at most F frames/s, paced in real time; 0: as fast as possible "
                        "(default: the video's own rate; a folder: as fast as possible)")
    p.add_argument("--loop", action="store_true", help="start over at the end, until interrupted")
    p.add_argument("--maxlen", type=_count, default=0, help="cap the stream (MAXLEN ~ N); 0: no cap")
    p.add_argument("--quality", type=_quality, default=90, help="JPEG quality (1 to 100; default 90)")
    p.add_argument("--max-frames", type=_count, default=0, help="stop after N frames; 0: no limit")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="S",
                   help="a URL that takes longer to open, or to give data, is an error (default 10)")
    p.add_argument("--redis-url", type=_a_redis_url, help="default: the configured redis_url")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no closing count")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("tail", help="print results (or dead-letters) as they arrive")
    config(p)
    p.add_argument("key", metavar="KEY", help="a result stream, or a glob such as 'results:people:*'")
    p.add_argument("--from", dest="start", default="$", type=_entry_id,
                   help="entry ID to start after; 0: from the beginning (default: new entries)")
    p.add_argument("--count", type=_count, default=0, help="exit after N entries (default 0: never)")
    p.add_argument("--timeout", type=_idle, default=0,
                   help="exit after S seconds with no entry (default 0: never)")
    p.add_argument("--json", action="store_true", help="one JSON object per entry")
    p.add_argument("--redis-url", type=_a_redis_url, help="default: the configured redis_url")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("status", help="a running daemon's pipelines, sources and jobs (the live page's "
                                      "figures)")
    config(p)
    p.add_argument("--url", help="its control plane, e.g. http://10.0.0.5:8000 (default: the config's)")
    p.add_argument("--token", help=TOKEN_HELP)
    p.add_argument("--json", action="store_true", help="the raw figures")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("summarize", help="a running daemon describes a video and summarises it",
                       description="Submit VIDEO as a job to a running daemon: MODEL describes its frames "
                                   "(captions, answers, detections), SUMMARY_MODEL writes the summary, "
                                   "printed at the end. Ctrl-C cancels the job.")
    config(p)
    p.add_argument("video", metavar="VIDEO",
                   help="an http(s) URL (MP4, HLS), an rtsp(s) camera, a redis:// stream, or a file on "
                        "the daemon's host under its jobs.allowed_paths")
    p.add_argument("--model", required=True, help="family/variant that reads the frames, e.g. a captioner")
    p.add_argument("--summary-model", default=DEFAULT_SUMMARY_MODEL,
                   help=f"family/variant of a text model (task generate; default: {DEFAULT_SUMMARY_MODEL})")
    p.add_argument("--prompt", default="", help="the frame model's prompt (a question, labels)")
    p.add_argument("--summary-prompt", default="", help="the text model's instruction")
    p.add_argument("--fps", type=float, default=1.0, help="frames read per second of video")
    p.add_argument("--max-frames", type=_positive, default=None, help="stop after N frames")
    p.add_argument("--max-seconds", type=_seconds, default=None,
                   help="stop after N seconds of video (a live source: of reading), then summarise")
    p.add_argument("--every", type=_period, default=None, metavar="SECONDS",
                   help="also summarise every SECONDS (at least 1) while it runs, each summary printed as "
                        "it comes (an rtsp camera or a redis stream needs this, --max-seconds or "
                        "--max-frames; live HLS without them is summarised every 300 s)")
    p.add_argument("--url", help="the daemon's control plane (default: the config's)")
    p.add_argument("--token", help=TOKEN_HELP)
    p.add_argument("--json", action="store_true",
                   help="JSON lines: each summary written while it runs, then the whole job "
                        "(its summary: the final one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("models", help="list the model catalogue")
    config(p)
    p.add_argument("--json", action="store_true", help="one JSON array of the entries")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="benchmark the daemon against raw and naive baselines")
    config(p)
    p.add_argument("--frames", type=_positive, default=300, help="frames to publish (per batch size)")
    p.add_argument("--size", type=_frame_size, default="1280x720", help="frame size, WxH")
    p.add_argument("--model", default=None, help="family/variant (default: the default model)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda:N")
    p.add_argument("--batch-sizes", type=_batch_sizes, default="1,8,32",
                   help="comma-separated (--daemons: the last)")
    p.add_argument("--no-draft", action="store_true", help="skip the scaled-JPEG-decoding comparison")
    p.add_argument("--null", action="store_true",
                   help="the pipeline's own ceiling: a model that does nothing, 1 KB and 1280x720 JPEGs")
    p.add_argument("--daemons", type=_count, default=0, metavar="N",
                   help="N daemon processes in one group vs one, with a model that sleeps")
    p.add_argument("--devices", default="", help="--daemons: devices dealt to the daemons in turn")
    p.add_argument("--sleep-ms", type=_millis, default=20, help="--daemons: the model's time per batch")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=cmd_bench)
    return top


def _redis_trouble(e: BaseException) -> str:
    """What went wrong with Redis, in words: a cluster node's redirect read as a plain error
    said only '13649 127.0.0.1:7103'."""
    if isinstance(e, MovedError) or (isinstance(e, ResponseError) and str(e).startswith("CROSSSLOT")):
        return ("that Redis is a Redis Cluster node: set redis_cluster = true in the config, or "
                "SIGHTSTREAM_REDIS_CLUSTER=true")
    if isinstance(e, RedisClusterException) and "Cluster mode is not enabled" in str(e):
        return "that Redis is not a Redis Cluster node: unset redis_cluster (or SIGHTSTREAM_REDIS_CLUSTER)"
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        for line in str(e).splitlines():  # one per bad setting
            print(f"sightstream: {line}", file=sys.stderr)
        return 2
    except SightstreamError as e:
        print(f"sightstream: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"sightstream: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sightstream tail … | head`: the reader has all it wanted
        # stdout's buffer would fail again at exit: point it at nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a Unix tool ended by SIGPIPE
    except (OSError, RedisError, RedisClusterException) as e:  # e.g. Redis refused the connection
        print(f"sightstream: {_redis_trouble(e)}", file=sys.stderr)
        return 1
