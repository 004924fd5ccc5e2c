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


def test_a_control_url_without_a_scheme_is_http(monkeypatch):
    args = cli.parser().parse_args(["status", "--url", "127.0.0.1:8095"])
    assert cli._control(args)[0] == "http://127.0.0.1:8095"
