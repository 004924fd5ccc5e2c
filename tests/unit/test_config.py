"""Settings: defaults that work on a laptop, TOML + environment, one clear line per bad setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sightstream.config import ModelEntry, Settings, load_settings
from sightstream.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "sightstream.toml"
    path.write_text(text)
    return path


def test_defaults_work_with_no_file():
    s = load_settings()
    assert s.redis_url == "redis://127.0.0.1:6379/0" and s.devices == "auto"
    assert s.control.port == 8000 and s.control.host == "127.0.0.1"
    (p,) = s.pipelines
    assert p.name == "people" and p.input == ["frames:*"] and p.model == "retinaface/mobilenet"
    assert p.output == "results:{pipeline}:{source}" and p.batch_size == 8 and p.max_deliveries == 5


def test_toml_then_environment_overrides(tmp_path, monkeypatch):
    path = write(tmp_path, """
redis_url = "redis://10.0.0.1:6379/0"
devices = ["cpu"]
[control]
port = 9000
[[pipelines]]
name = "cams"
input = ["frames:{cam1}", "frames:{cam2}"]
fps = 2.5
[models.yolo.coco]
backend = "onnx"
task = "detect"
path = "/srv/models/yolov8n.onnx"
score_threshold = 0.4
""")
    monkeypatch.setenv("SIGHTSTREAM_CONTROL__PORT", "9100")
    s = load_settings(path)
    assert s.control.port == 9100  # the environment wins over the file
    assert s.redis_url == "redis://10.0.0.1:6379/0" and s.devices == ["cpu"]
    assert s.pipelines[0].fps == 2.5 and len(s.pipelines[0].input) == 2
    entry = s.models["yolo"]["coco"]
    assert entry.path == "/srv/models/yolov8n.onnx" and entry.model_extra == {"score_threshold": 0.4}


@pytest.mark.parametrize(
    "toml,needle",
    [
        ("[[pipelines]]\nname = 'Bad Name'", "pipelines[0].name: must match [a-z0-9_-]+"),
        ("[[pipelines]]\nname = 'job'", "pipelines[0].name: job is kept for jobs' result streams"),
        ("[[pipelines]]\nfps = -1", "pipelines[0].fps"),
        ("[[pipelines]]\nbatch_size = 0", "pipelines[0].batch_size"),
        ("[[pipelines]]\nmodel = 'nofamily'", "pipelines[0].model: must be family/variant"),
        ("[[pipelines]]\noutput = 'results:{camera}'", "may use only {pipeline} and {source}"),
        ("[[pipelines]]\ninput = ['results:people:*']", "own output streams"),
        ("[[pipelines]]\ninput = ['results:elsewhere:*']", "to run a model on another pipeline's results, chain it"),
        ("[[pipelines]]\ninput = ['results:*']", "names result streams, which hold no frames"),
        ("[[pipelines]]\nname = 'up'\noutput = 'dets:{pipeline}:{source}'\n[[pipelines]]\nname = 'down'\n"
         "input = ['dets:up:*']", "pipeline down: input 'dets:up:*' would read pipeline up's result streams"),
        ("[[pipelines]]\nfsp = 3", "pipelines[0].fsp: Extra inputs are not permitted; did you mean fps?"),
        ("[control]\nprot = 1", "control.prot: Extra inputs are not permitted; did you mean port?"),
        ("[jobs]\nzzz = 1", "jobs.zzz: Extra inputs are not permitted"),
        ("[[pipelines]]\nname='a'\n[[pipelines]]\nname='a'", "pipeline names must be unique"),
        ("[[pipelines]]\nname='a'\nprompt_from='a'", "pipeline a cannot take its prompts from itself"),
        ("[[pipelines]]\nname='a'\nprompt_from='b'\n[[pipelines]]\nname='b'\nprompt_from='a'",
         "pipelines a, b take prompts from each other"),
        ("[[pipelines]]\nname='a'\nprompt_from='elsewhere'", "set `input` to that pipeline's result streams"),
        ("devices = ['gpu0']", "devices"),
        ("redis_url = 'localhost:6379'", "redis_url: must start with redis://"),
        ("redis_url = 'redis://127.0.0.1:notaport/0'",  # a traceback at start, exit 1
         "redis_url: cannot be read: its port is not a number"),
        ("redis_url = 'redis://:pa#ss@127.0.0.1:6379/0'",  # the error quoted the password's start
         "redis_url: cannot be read: its port is not a number (a password holding # ? / or @ must be"),
        ("[control]\nport = 99999", "control.port"),
        ("redis_url = = 1", "cannot read"),
        # infinity passed, then stopped the daemon at its first frame (fps) or at start
        ("[[pipelines]]\nfps = inf", "pipelines[0].fps: Input should be a finite number"),
        ("[[pipelines]]\nfps = 1e300", "pipelines[0].fps: Input should be less than or equal to 1000"),
        ("[jobs]\nttl_s = inf", "jobs.ttl_s: Input should be a finite number"),
        ("[control]\nmax_upload_mb = inf", "control.max_upload_mb: Input should be a finite number"),
        ("inference_timeout_s = inf", "inference_timeout_s: Input should be a finite number"),
        ("[models.m.v]\ntimeout_s = inf", "timeout_s: Input should be a finite number"),
        ("redis_cluster = true\nredis_url = 'redis://127.0.0.1:7000/1'",
         "redis_url: a Redis Cluster has only database 0, and the URL names database 1"),
        ("[[pipelines]]\nname='a'\nprompt_from='a'\ninput=['x:*']", "pipeline a cannot take its prompts from itself"),
        ("[manager.max_memory_mb]\n'cuda:0' = -5", "manager.max_memory_mb.cuda:0: Input should be greater than 0"),
        ("[jobs]\nallowed_paths = ['videos']", "jobs.allowed_paths: 'videos' is not an absolute path"),
        # TOML reads the dot as a nested table: it was a new model qwen2_5/0, without a word
        ("[models.qwen2_5.0.5b-instruct]\npath = '/tmp'",
         "[models.qwen2_5.0.5b-instruct] reads as model qwen2_5/0 with a table '5b-instruct': a variant "
         "whose name has a dot must be quoted, [models.qwen2_5.\"0.5b-instruct\"]"),
        ("[models.qwen2_5.0.5b-instruct]\nmax_new_tokens = 64",  # an option alone: the same mistake
         "[models.qwen2_5.0.5b-instruct] reads as model qwen2_5/0"),
    ],
)
def test_each_bad_setting_gives_one_line_naming_it(tmp_path, toml, needle):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, toml))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_several_bad_settings_give_a_line_each(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, "[control]\nprot = 1\n[[pipelines]]\nbatch_size = 0"))
    assert str(e.value).splitlines() == [
        "invalid setting control.prot: Extra inputs are not permitted; did you mean port?",
        "invalid setting pipelines[0].batch_size: Input should be greater than or equal to 1"]


def test_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("SIGHTSTREAM_CONTROL__PORT", "http")
    with pytest.raises(ConfigError, match="control.port"):
        load_settings()



@pytest.mark.parametrize("name,value", [
    ("SIGHTSTREAM_JOBS__ALLOWED_PATHS", "/tmp"),  # said "cannot read None: … field jobs"
    ("SIGHTSTREAM_PIPELINES", '[{"name": "people", "fps": 5}'),  # blamed the TOML file
])
def test_a_variable_whose_list_is_not_json_is_named(monkeypatch, tmp_path, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"^invalid setting \w+: {name} cannot be read; a list or a table "
                                          r"in a variable is written as JSON"):
        load_settings()
    toml = tmp_path / "s.toml"
    toml.write_text("devices = ['cpu']\n")
    with pytest.raises(ConfigError, match=rf"{name} cannot be read"):
        load_settings(toml)


@pytest.mark.parametrize("name,value,needle", [
    ("SIGHTSTREAM_REDIS_URLL", "redis://x:6379", "SIGHTSTREAM_REDIS_URLL names no setting; did you mean SIGHTSTREAM_REDIS_URL?"),
    ("sightstream_devicez", "cpu", "did you mean SIGHTSTREAM_DEVICES?"),  # as case-blind as the settings
    ("SIGHTSTREAM_CONTRL__PORT", "9000", "did you mean SIGHTSTREAM_CONTROL__PORT?"),  # not ..._CONTROL
    ("SIGHTSTREAM_NOTHING_LIKE_IT", "1", "SIGHTSTREAM_NOTHING_LIKE_IT names no setting"),
    ("SIGHTSTREAM_PIPELINES__0__FPS", "5", "set SIGHTSTREAM_PIPELINES to the whole list as JSON"),
    ("SIGHTSTREAM_DEVICES", "gpu", "invalid setting devices: 'gpu' is not a device"),
    ("SIGHTSTREAM_CONTROL__PROT", "1", "invalid setting control.prot: Extra inputs are not permitted; did you mean port?"),
])
def test_an_environment_variable_that_names_no_setting_is_refused(monkeypatch, name, value, needle):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_devices_from_the_environment_may_be_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("SIGHTSTREAM_DEVICES", "cpu, cuda:1")
    assert load_settings().devices == ["cpu", "cuda:1"]
    monkeypatch.setenv("SIGHTSTREAM_DEVICES", '["cuda:0"]')
    assert load_settings().devices == ["cuda:0"]
    monkeypatch.setenv("SIGHTSTREAM_TEST_ANYTHING", "the test suite's own variables are not settings")
    monkeypatch.setenv("SIGHTSTREAM_PIPELINES", '[{"name": "people", "fps": 5}]')
    assert load_settings().pipelines[0].fps == 5


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_a_config_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory, not a TOML file"):
        load_settings(tmp_path)
    locked = write(tmp_path, "[control]\nport = 9000")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads it anyway
        monkeypatch.setattr(Path, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(ConfigError, match=f"config file {locked} cannot be read: Permission denied"):
        load_settings(locked)
    # the default path, when something is there, is read or refused: never the defaults unsaid
    monkeypatch.setattr("sightstream.config.DEFAULT_CONFIG", tmp_path)
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings()


def test_a_chained_pipeline_reads_its_upstreams_result_streams(tmp_path):
    s = load_settings(write(tmp_path, """
[[pipelines]]
name = "masks"
prompt_from = "boxes"
[[pipelines]]
name = "tracks"
prompt_from = "masks-src"
input = ["results:elsewhere:*"]
[[pipelines]]
name = "boxes"
prompt_from = "people"
[[pipelines]]
name = "people"
input = ["frames:{cam1}", "cams:*"]
output = "out:{source}:{pipeline}"
"""))
    inputs = {p.name: p.input for p in s.pipelines}
    assert inputs["boxes"] == ["out:frames:{cam1}:people", "out:cams:*:people"]
    # derived from the upstream's own derived input, whatever the order in the file
    assert inputs["masks"] == ["results:boxes:out:frames:{cam1}:people", "results:boxes:out:cams:*:people"]
    assert inputs["tracks"] == ["results:elsewhere:*"]  # given: the upstream runs elsewhere


def test_a_chain_follows_its_upstream_s_streams_not_its_videos():
    """A chained pipeline reads each frame back from its source stream; a video's frames are
    not in Redis, so its results would all dead-letter: they are not read at all."""
    url = "https://cam.example/live.m3u8"
    s = Settings(pipelines=[{"name": "people", "input": ["frames:{a}", url]},
                            {"name": "masks", "prompt_from": "people"}])
    assert s.pipelines[1].input == ["results:people:frames:{a}"]
    with pytest.raises(ValueError, match="whose inputs are all video URLs.*sightstream publish"):
        Settings(pipelines=[{"name": "people", "input": [url]}, {"name": "masks", "prompt_from": "people"}])


def test_a_model_no_adapter_serves_is_refused_at_start():
    from sightstream.daemon.daemon import Daemon

    settings = Settings(devices=["cpu"], models={"x": {"y": {"backend": "torch", "task": "depth", "path": "/tmp"}}})
    with pytest.raises(ConfigError, match="no adapter serves backend 'torch' with task 'depth'"):
        Daemon(settings)
    # a pipeline's model whose options its adapter refuses: at start, not per frame (it used to
    # kill the daemon at the first frame, and every daemon that took the frame over)
    settings = Settings(devices=["cpu"], models={"x": {"y": {
        "backend": "torch", "adapter": "tests.fake_adapters:Scripted", "threshold": "abc"}}},
        pipelines=[{"name": "p", "model": "x/y"}])
    with pytest.raises(ConfigError, match=r"pipelines\[p\].model: model x/y: its adapter .* ValueError"):
        Daemon(settings)


def test_a_table_option_and_a_quoted_variant_with_a_dot_are_taken(tmp_path):
    settings = load_settings(write(tmp_path, '[models.qwen2_5."0.5b-instruct"]\npath = "/tmp/q"\n'
                                             '[models.yolo.v8n]\ncuda_options = {arena_extend_strategy = 1}'))
    assert settings.models["qwen2_5"]["0.5b-instruct"].path == "/tmp/q"
    assert settings.models["yolo"]["v8n"].model_extra == {"cuda_options": {"arena_extend_strategy": 1}}


def test_a_folder_given_to_the_default_onnx_backend_is_refused_at_start(tmp_path):
    """A transformers model's folder with no backend set: every frame was dead-lettered
    (INVALID_PROTOBUF) by a daemon that had started as if all was well."""
    from sightstream.daemon.daemon import Daemon

    settings = Settings(devices=["cpu"], models={"my": {"det": {"path": str(tmp_path)}}},
                        pipelines=[{"name": "p", "model": "my/det"}])
    with pytest.raises(ConfigError, match=r"my/det: backend onnx \(the default\) needs an .onnx file, and "
                                          r".* is a folder; a transformers model's folder needs backend"):
        Daemon(settings)


@pytest.mark.parametrize("url,shown", [
    ("rtsp://viewer:s3cret@10.0.0.17:554/stream1", "rtsp://10.0.0.17:554/stream1"),
    ("https://cams.example/live.m3u8?token=abc&quality=hd", "https://cams.example/live.m3u8?token=***&quality=hd"),
    ("rtsp://cam.local/h264?user=admin&password=x", "rtsp://cam.local/h264?user=admin&password=***"),
    ("http://u:p@h/a#frag@x", "http://h/a#frag@x"),  # only the host part's user goes
    ("https://host/a?email=a@b.c", "https://host/a?email=a@b.c"),
    ("redis://frames:{cam@1}", "redis://frames:{cam@1}"),  # a stream key, not a URL with a user
    ("https://b.s3.amazonaws.com/v.mp4?X-Amz-Credential=a&X-Amz-Security-Token=t&X-Amz-Signature=s&x=1",
     "https://b.s3.amazonaws.com/v.mp4?X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***&x=1"),
    ("https://a.blob.core.windows.net/c/v.mp4?sv=2024&sig=abc", "https://a.blob.core.windows.net/c/v.mp4?sv=2024&sig=***"),
    ("https://h/v.m3u8?apikey=k&api_key=k&key=k&monkey=ok", "https://h/v.m3u8?apikey=***&api_key=***&key=***&monkey=ok"),
    ("https://h/v.m3u8?auth=a&x-auth=a&oauth=ok&hdnts=exp~acl~hmac",
     "https://h/v.m3u8?auth=***&x-auth=***&oauth=ok&hdnts=***"),
    ("https://h/v.m3u8?%74oken=a&Token=b&my%5Fsecret=c&q=%74oken", "https://h/v.m3u8?%74oken=***&Token=***&my%5Fsecret=***&q=%74oken"),
    ("file:///srv/videos/clip.mp4", "file:///srv/videos/clip.mp4"),
    ("/srv/clip.mp4", "/srv/clip.mp4"),
    ("http://[::1]:8129/x.mp4?token=s", "http://[::1]:8129/x.mp4?token=***"),  # an IPv6 host's brackets stay
    # a password with an unencoded # or ? (the URL parser ends the host part there): all before the @ goes
    ("rtsp://viewer:Adm1n#2024@10.0.0.17:554/stream1", "rtsp://10.0.0.17:554/stream1"),
    ("rtsp://viewer:a?b@cam/h264?channel=2", "rtsp://cam/h264?channel=2"),  # an NVR's channels stay apart
    ("rtsp://admin:p/ss@cam/live", "rtsp://cam/live"),
    # an @ in a query is no user's: the host stays, the secret is masked
    ("rtsp://nvr:554?user=admin&password=p@ss", "rtsp://nvr:554?user=admin&password=***"),
    ("http://host?email=a@b.com", "http://host?email=a@b.com"),
    ("https://medium.example/@user/post", "https://medium.example/@user/post"),
    ("http://[::1]/a@b", "http://[::1]/a@b"),
    ("rtsp://cam/live?user=admin&pw=x&cpw=ok", "rtsp://cam/live?user=admin&pw=***&cpw=ok"),  # logs show the query
])
def test_a_video_url_is_shown_without_its_credentials(url, shown):
    from sightstream import keys

    assert keys.public_url(url) == shown


def test_one_camera_named_twice_with_different_credentials_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="rtsp://10.0.0.17/s1 is named twice"):
        load_settings(write(tmp_path, """
[[pipelines]]
input = ["rtsp://a:1@10.0.0.17/s1", "rtsp://b:2@10.0.0.17/s1"]
"""))
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, '[[pipelines]]\ninput = ["ftp://me:s3cret@host/x.mp4"]'))
    assert "ftp://: a video input is" in str(e.value) and "s3cret" not in str(e.value)


def test_a_password_with_a_hash_is_named_nowhere_in_a_refusal(tmp_path):
    """`#` ends the host part for a URL parser: the password was printed whole (a camera's, in
    the pipeline's input), or its start quoted as a port that is not a number (Redis's)."""
    from sightstream.daemon.daemon import Daemon

    with pytest.raises(ConfigError) as redis_refusal:
        load_settings(write(tmp_path, "redis_url = 'redis://:s3cret#x@127.0.0.1:6379/0'"))
    settings = Settings(devices=["cpu"], pipelines=[{"name": "p", "input": [
        "rtsp://viewer:s3cret#x@10.0.0.17:554/stream1"]}])
    with pytest.raises(ConfigError) as camera_refusal:
        Daemon(settings)
    for refusal in (redis_refusal, camera_refusal):
        assert "s3cret" not in str(refusal.value) and "must be percent-encoded" in str(refusal.value)
    assert "rtsp://10.0.0.17:554/stream1" in str(camera_refusal.value)


def test_an_ocr_entry_may_point_at_a_folder(tmp_path):
    """Only the ONNX adapters that read one file refuse a folder (OCR reads its models' folder)."""
    from sightstream.models.catalogue import Catalogue

    catalogue = Catalogue({"my": {"ocr": ModelEntry(adapter="ocr", path=str(tmp_path))}})
    assert catalogue.get("my/ocr").resolve() == str(tmp_path)
