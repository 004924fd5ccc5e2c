"""The CLI refuses numbers it cannot use, with exit 2 and a sentence naming the option (they
were taken: --quality 500, --max-frames -5 published one frame, --stream '' wrote to key "")."""

from __future__ import annotations

import pytest

from sightstream import cli


@pytest.mark.parametrize("argv,says", [
    (["publish", "v.mp4", "--stream", ""], "a stream key cannot be empty"),
    (["publish", "v.mp4", "--stream", "s", "--fps", "-1"], "--fps: -1 is not a rate"),
    (["publish", "v.mp4", "--stream", "s", "--fps", "nan"], "--fps: nan is not a rate"),
    (["publish", "v.mp4", "--stream", "s", "--quality", "500"], "--quality: 500 is not a JPEG quality"),
    (["publish", "v.mp4", "--stream", "s", "--quality", "0"], "--quality: 0 is not a JPEG quality"),
    (["publish", "v.mp4", "--stream", "s", "--max-frames", "-5"], "--max-frames: -5 is negative"),
    (["publish", "v.mp4", "--stream", "s", "--maxlen", "-5"], "--maxlen: -5 is negative"),
    (["tail", "k", "--count", "-1"], "--count: -1 is negative"),
    (["tail", "k", "--timeout", "-1"], "--timeout: -1 is not a number of seconds"),
    (["tail", "k", "--count", "abc"], "--count: 'abc' is not a whole number"),  # not "invalid _count value"
    (["publish", "v.mp4", "--stream", "s", "--fps", "fast"], "--fps: 'fast' is not a number"),
    (["summarize", "v.mp4", "--model", "a/b", "--every", "0.5"], "--every: 0.5 is not a number of seconds of at least 1"),
    (["summarize", "v.mp4", "--model", "a/b", "--max-seconds", "inf"], "--max-seconds: inf is not a positive number"),
    (["summarize", "v.mp4", "--model", "a/b", "--max-frames", "0"], "--max-frames: 0 is not a positive number"),
    # these were tracebacks (exit 1), or hung for ever (--daemons -1, --sleep-ms -5)
    (["tail", "k", "--redis-url", "notaurl"], "--redis-url: 'notaurl' is not a Redis URL"),
    (["publish", "v.mp4", "--stream", "s", "--redis-url", "redis://127.0.0.1:notaport/0"],
     "--redis-url: 'redis://127.0.0.1:notaport/0' is not a Redis URL (redis://host:port/db, rediss://… "
     "or unix://…): it cannot be read: its port is not a number"),
    (["tail", "k", "--redis-url", "redis://:s3cret@h:99999/0"], "'redis://:***@h:99999/0' is not a Redis URL"),
    (["tail", "k", "--from", "bogus"], "--from: 'bogus' is not a stream entry ID"),
    (["demo", "--seconds", "0"], "--seconds: 0 is not a number of seconds of at least 1"),  # a video of nothing
    (["bench", "--size", "12x"], "--size: '12x' is not a frame size WxH"),
    (["bench", "--batch-sizes", "a"], "--batch-sizes: 'a' is not a list of batch sizes"),
    (["bench", "--batch-sizes", "8,0"], "--batch-sizes: '8,0' is not a list of batch sizes"),
    (["bench", "--frames", "0"], "--frames: 0 is not a positive number"),
    (["bench", "--daemons", "-1"], "--daemons: -1 is negative"),
    (["bench", "--sleep-ms", "-5"], "--sleep-ms: -5 is not a number of milliseconds"),
])
def test_a_number_the_command_cannot_use_is_refused(argv, says, capsys):
    with pytest.raises(SystemExit) as ended:
        cli.parser().parse_args(argv)
    assert ended.value.code == 2 and says in capsys.readouterr().err


def test_what_it_can_use_is_taken():
    args = cli.parser().parse_args(["publish", "v.mp4", "--stream", "s", "--fps", "0", "--quality", "100",
                                    "--max-frames", "0", "--maxlen", "0"])
    assert (args.fps, args.quality, args.max_frames, args.maxlen) == (0.0, 100, 0, 0)
    args = cli.parser().parse_args(["tail", "k", "--count", "0", "--timeout", "2.5"])
    assert (args.count, args.timeout) == (0, 2.5)
    for start in ("$", "0", "1700000000000", "1700000000000-3"):
        assert cli.parser().parse_args(["tail", "k", "--from", start]).start == start
    args = cli.parser().parse_args(["bench", "--size", "640x480", "--batch-sizes", "1, 8", "--frames", "5"])
    assert (args.size, args.batch_sizes, args.frames) == ("640x480", "1, 8", 5)


def test_a_gpu_the_bench_cannot_use_is_one_line_and_exit_2(capsys, monkeypatch):
    from sightstream.daemon import devices

    monkeypatch.setattr(devices, "_onnxruntime_has_cuda", lambda: False)
    monkeypatch.setattr(devices, "_torch_has_cuda", lambda: False)
    assert cli.main(["bench", "--device", "cuda:0", "--frames", "1"]) == 2
    assert "sightstream: invalid setting devices: cuda:0 is not a GPU this process can use" in capsys.readouterr().err


def test_redis_trouble_says_what_to_set():
    from redis.exceptions import MovedError, RedisClusterException, ResponseError

    assert "set redis_cluster = true" in cli._redis_trouble(MovedError("13649 127.0.0.1:7103"))
    assert "set redis_cluster = true" in cli._redis_trouble(
        ResponseError("CROSSSLOT Keys in request don't hash to the same slot"))
    assert "not a Redis Cluster node" in cli._redis_trouble(RedisClusterException(
        "Redis Cluster cannot be connected. Please provide at least one reachable node: Cluster mode is not "
        "enabled on this node"))


def test_a_control_url_without_a_scheme_is_http(monkeypatch):
    args = cli.parser().parse_args(["status", "--url", "127.0.0.1:8095"])
    assert cli._control(args)[0] == "http://127.0.0.1:8095"
