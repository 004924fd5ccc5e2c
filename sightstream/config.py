"""Settings: a TOML file overridden by SIGHTSTREAM_* environment variables (nested with `__`).

Every setting has a default that works on a laptop with no GPU. `load_settings` validates once;
a bad setting raises ConfigError with one line naming it.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, TomlConfigSettingsSource

from sightstream import keys
from sightstream.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/sightstream/sightstream.toml")
DEFAULT_MODEL = "retinaface/mobilenet"
NAME_RE = re.compile(r"^[a-z0-9_-]+$")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_redis_url(url: str) -> str:
    """The URL, if redis-py can connect with it; else a ValueError that says why (a port that
    is not a number was a traceback at start)."""
    from redis.connection import parse_url

    if not url.startswith(REDIS_SCHEMES):
        raise ValueError("must start with redis://, rediss:// or unix://")
    try:
        parse_url(url)
    except ValueError as e:
        raise ValueError(f"cannot be read: {keys.url_error(e)}") from None
    return url
VIDEO_SCHEMES = ("http://", "https://", "rtsp://", "rtsps://", "file://")


class _Strict(BaseModel):
    # validate_default: a float setting left at its default is a float too (`fps` showed as 0
    # in one pipeline's figures and 0.0 in another's)
    # allow_inf_nan: `fps = inf` passed, then stopped the daemon at its first frame
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ControlSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: str = ""
    tokens: dict[str, str] = Field(
        default_factory=dict,
        description="named bearer tokens (name = token), accepted beside `token`; the name is "
                    "recorded as who changed a prompt or submitted a job")
    allowed_host_names: list[str] = Field(
        default_factory=list, description="without a token, names a request's Host may give beside "
        "addresses, loopback names and this machine's host name (a compose service's name, say): "
        "any other is refused, as a page rebound to this address would give its own")
    max_upload_mb: float = Field(20, gt=0)
    predict_batch_size: int = Field(8, ge=1, le=1024, description="/predict images per model call")
    predict_batch_timeout_ms: float = Field(10, ge=0, description="/predict: wait this long to fill a batch")
    predict_max_images: int = Field(256, ge=1, description="images in one /predict request (tar, multipart)")
    predict_max_pixels: int = Field(
        200_000_000, gt=0, description="decoded pixels all /predict requests hold at once (3 bytes each): "
        "an upload waits its turn past it (a 6300x6300 PNG of 115 KB is 40 million)")
    page_sources: int = Field(64, ge=0, description="sources the live page (GET /) keeps a latest frame of")

    @property
    def auth(self) -> bool:
        return bool(self.token or self.tokens)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class DecodeSettings(_Strict):
    max_pixels: int = Field(40_000_000, gt=0, description="bigger images are dead-lettered (bombs)")
    threads: int = Field(0, ge=0, description="decode threads; 0: one per CPU core")
    draft: bool = Field(True, description="JPEG DCT-scaled decoding when the model shrinks frames "
                        "(detect, classify, caption, vqa)")
    device: str = Field("cpu", pattern=r"^(cpu|cuda:\d+)$", description="where JPEGs are decoded: cpu, "
                        "or cuda:N (nvJPEG through torchvision; other formats stay on the CPU)")


class ManagerSettings(_Strict):
    idle_unload_s: float = Field(600, ge=0, description="unload models unused this long; 0: never")
    max_memory_mb: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="memory budget per device, e.g. {\"cuda:0\" = 20000}"
    )
    gpu_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="budget of a GPU not in max_memory_mb: this share of its free memory"
    )
    load_timeout_s: float = Field(
        600, gt=0, description="a model load that takes longer (from when its device thread starts it) is "
        "given up: its device thread is replaced, and its frames are retried later")


def is_video_url(item: str) -> bool:
    return item.lower().startswith(VIDEO_SCHEMES)


class JobSettings(_Strict):
    allowed_paths: list[str] = Field(
        default_factory=list, description="file:// job sources only under these folders; empty: none")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="http(s) and rtsp(s) job sources only from these hosts; empty: any host")
    ttl_s: float = Field(86_400, gt=0, description="finished jobs and their results expire after this")
    max_concurrent: int = Field(4, ge=1, description="jobs one daemon runs at once")
    max_in_flight: int = Field(16, ge=1, description="frames of one job between decoding and publication")
    lease_ttl_ms: int = Field(10_000, ge=500, description="a dead daemon's jobs are taken over after this")
    poll_s: float = Field(1.0, gt=0, description="how often a daemon looks for jobs to take (beside notices)")
    batch_size: int = Field(8, ge=1, le=1024)
    batch_timeout_ms: float = Field(20, ge=0)
    result_maxlen: int = Field(100_000, ge=0, description="MAXLEN ~ of a job's results; 0: no cap")
    open_timeout_s: float = Field(10, gt=0, description="opening a video source")
    read_timeout_s: float = Field(10, gt=0, description="one read of a video source")
    stall_s: float = Field(20, gt=0, description="a source with no frame for this long is reopened")
    give_up_s: float = Field(
        60, gt=0, description="a user's job whose video gives no frame for this long fails "
                              "(a pipeline's camera is retried until it is back)")

    @field_validator("allowed_paths")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        """A relative folder would be the daemon's working directory's, whatever it is then."""
        if (relative := [p for p in v if not p.startswith("/")]):
            raise ValueError(f"{relative[0]!r} is not an absolute path")
        return v


class PipelineSettings(_Strict):
    name: str = "people"
    input: list[str] = Field(default_factory=lambda: ["frames:*"], min_length=1)
    model: str = DEFAULT_MODEL
    prompt: str = ""
    fps: float = Field(0, ge=0, le=1000, description="0: every frame; else at most this many results per "
                       "second of capture time per source")
    batch_size: int = Field(8, ge=1, le=1024)
    batch_timeout_ms: float = Field(10, ge=0)
    max_age_ms: int = Field(0, ge=0)
    output: str = keys.DEFAULT_OUTPUT
    max_deliveries: int = Field(5, ge=1)
    result_maxlen: int = Field(10_000, ge=0, description="MAXLEN ~ of result streams; 0: no cap")
    result_ttl_s: int = Field(0, ge=0, le=10 * 365 * 86400, description="a result or dead-letter stream "
                              "expires this long after its last entry (a retired camera's go); 0: never")
    max_in_flight: int = Field(64, ge=1, description="frames read but not yet acknowledged")
    skip_history: bool = Field(
        False, description="a consumer group made for this pipeline starts when the daemon started, not "
        "at the stream's oldest frame: adding or renaming a pipeline over streams that hold days of "
        "frames does not process them all (groups that exist are not moved)")
    prompt_from: str = Field(
        "", description="chain: read this pipeline's detect results and prompt the model with them"
    )

    @field_validator("name", "prompt_from")
    @classmethod
    def _name(cls, v: str, info: ValidationInfo) -> str:
        if (v or info.field_name == "name") and not NAME_RE.match(v):
            raise ValueError("must match [a-z0-9_-]+")
        if info.field_name == "name" and v == "job":  # results:job:… are jobs' result streams
            raise ValueError("job is kept for jobs' result streams (results:job:…): "
                             "name the pipeline otherwise")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v.count("/") != 1 or not all(v.split("/")):
            raise ValueError("must be family/variant")
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"is not a valid template: {e}") from None
        if not names <= {"pipeline", "source"}:
            raise ValueError("may use only {pipeline} and {source}")
        return v

    @property
    def streams(self) -> list[str]:
        """The input's stream keys and globs."""
        return [i for i in self.input if not is_video_url(i)]

    @property
    def shown_input(self) -> list[str]:
        """`input` as the APIs show it: video URLs without their credentials (keys.public_url)."""
        return [keys.public_url(i) for i in self.input]

    @property
    def videos(self) -> list[str]:
        """The input's video URLs (HLS, HTTP, RTSP, files): each read by one daemon at a time."""
        return [i for i in self.input if is_video_url(i)]

    @field_validator("input")
    @classmethod
    def _input(cls, v: list[str]) -> list[str]:
        for item in v:
            if "://" in item and not is_video_url(item):
                raise ValueError(f"{item.split('://')[0]}://: a video input is an http://, https://, "
                                 "rtsp://, rtsps:// or file:// URL")
        shown = [keys.public_url(i) for i in v if is_video_url(i)]
        if twice := sorted({s for s in shown if shown.count(s) > 1}):
            raise ValueError(f"{twice[0]} is named twice (with different credentials?): its results would "
                             "go to one stream from two readers")
        return v

    @model_validator(mode="after")
    def _output_not_input(self) -> PipelineSettings:
        own = [keys.output_glob(self.output, self.name)]
        for pattern in self.streams:
            if keys.is_own_output(pattern.replace("*", "x"), own):
                raise ValueError(f"input {pattern!r} would read sightstream's own output streams")
            if not self.prompt_from and re.split(r"[*?\[]", pattern)[0].startswith("results:"):
                raise ValueError(f"input {pattern!r} names result streams, which hold no frames; to run a "
                                 "model on another pipeline's results, chain it (prompt_from)")
        return self


Task = Literal["detect", "segment", "depth", "caption", "vqa", "track", "classify", "generate"]
TASKS: frozenset[str] = frozenset(get_args(Task))


class ModelEntry(BaseModel):
    """A catalogue entry added or overridden from the config; backend-specific options allowed."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    backend: Literal["onnx", "transformers", "sam2", "torch"] = "onnx"
    task: Task = "detect"
    path: str = ""
    adapter: str = ""
    timeout_s: float | None = Field(
        None, gt=0, description="how long one call of this model may take (default: inference_timeout_s; "
        "text models: at least 600)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SIGHTSTREAM_", env_nested_delimiter="__", extra="forbid", allow_inf_nan=False
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = Field(False, description="redis_url is a node of a Redis Cluster")
    devices: Literal["auto"] | list[str] = "auto"
    reclaim_min_idle_ms: int = Field(30_000, ge=100)
    consumer_slots: int = Field(64, ge=1, description="consumer names tried per host")
    shutdown_timeout_s: float = Field(10, gt=0)
    inference_timeout_s: float = Field(60, gt=0)
    batches_per_device: int = Field(
        2, ge=1, le=16, description="frames' batches in flight per device: one on the device while the "
        "next is prepared and the last finished on the CPU (a text model's call runs beside them)")
    prompt_poll_s: float = Field(
        5, gt=0, description="every daemon re-reads the prompts this often, in case a change notice was lost")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["console", "json"] = "console"
    control: ControlSettings = Field(default_factory=ControlSettings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    manager: ManagerSettings = Field(default_factory=ManagerSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    pipelines: list[PipelineSettings] = Field(default_factory=lambda: [PipelineSettings()])
    models: dict[str, dict[str, ModelEntry]] = Field(default_factory=dict)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return check_redis_url(v)

    @field_validator("devices", mode="before")
    @classmethod
    def _device_words(cls, v: Any) -> Any:
        """A string other than "auto" (an environment variable) is a comma-separated list."""
        if isinstance(v, str) and v != "auto":
            return [d.strip() for d in v.split(",") if d.strip()]
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must list at least one device, or be \"auto\"")
            for d in v:
                if d != "cpu" and not re.fullmatch(r"cuda:\d+", d):
                    raise ValueError(f"{d!r} is not a device: use \"cpu\" or \"cuda:N\"")
            if len(set(v)) != len(v):
                raise ValueError("lists a device twice")
        return v

    @model_validator(mode="after")
    def _cluster_database(self) -> Settings:
        """A Redis Cluster has database 0 only (redis-py's refusal was a traceback)."""
        if self.redis_cluster:
            path = urlsplit(self.redis_url).path.strip("/")
            if path not in ("", "0"):
                raise ValueError(f"redis_url: a Redis Cluster has only database 0, and the URL names "
                                 f"database {path}")
        return self

    @field_validator("models")
    @classmethod
    def _variants_with_dots(cls, v: dict[str, dict[str, ModelEntry]]) -> dict[str, dict[str, ModelEntry]]:
        """`[models.qwen2_5.0.5b-instruct]` is, to TOML, variant "0" with a table "5b-instruct":
        it was taken as a new model `qwen2_5/0`, without a word, and the entry meant to change
        `qwen2_5/0.5b-instruct` changed nothing. An option that is a table holding an entry's
        own fields (path, backend, task, adapter), or any table under a variant named by digits
        alone, is that mistake."""
        entry_fields = set(ModelEntry.model_fields)
        for family, variants in v.items():
            for variant, entry in variants.items():
                for name, value in (entry.model_extra or {}).items():
                    # an entry's own field inside, or a variant "0" (of "0.5b-instruct")
                    if isinstance(value, dict) and (entry_fields & set(value) or variant.isdigit()):
                        raise ValueError(
                            f"[models.{family}.{variant}.{name}] reads as model {family}/{variant} with a "
                            f"table {name!r}: a variant whose name has a dot must be quoted, "
                            f'[models.{family}."{variant}.{name}"]')
        return v

    @model_validator(mode="after")
    def _unique_pipelines(self) -> Settings:
        names = [p.name for p in self.pipelines]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"pipeline names must be unique: {', '.join(sorted(dup))}")
        return self

    @model_validator(mode="after")
    def _chains(self) -> Settings:
        """A chained pipeline reads its upstream's result streams: derived from the upstream's
        input and output unless `input` is given (an upstream configured elsewhere)."""
        by_name = {p.name: p for p in self.pipelines}
        derived: set[str] = set()

        def derive(p: PipelineSettings, path: tuple[str, ...]) -> None:
            if p.prompt_from == p.name:  # also with `input` given: it would read its own results
                raise ValueError(f"pipeline {p.name} cannot take its prompts from itself")
            if not p.prompt_from or p.name in derived or "input" in p.model_fields_set:
                return
            if p.prompt_from in path:
                raise ValueError(f"pipelines {', '.join(path + (p.name,))} take prompts from each other")
            up = by_name.get(p.prompt_from)
            if up is None:
                raise ValueError(
                    f"pipeline {p.name}: prompt_from names {p.prompt_from!r}, which is not in this "
                    "config; set `input` to that pipeline's result streams"
                )
            derive(up, path + (p.name,))
            # A chain reads each frame back from its source stream: a video's frames are not in
            # Redis, so a video input's results cannot be followed.
            p.input = [keys.result_stream(up.output, up.name, source) for source in up.streams]
            if not p.input:
                raise ValueError(
                    f"pipeline {p.name}: prompt_from names {up.name}, whose inputs are all video URLs; a "
                    "chained pipeline reads each frame back from its Redis stream, and a video's frames "
                    "are not in Redis: publish the video to a stream (sightstream publish) instead")
            derived.add(p.name)

        for p in self.pipelines:
            derive(p, ())
        # Each pipeline's results are never read as input but by its chained pipelines: an
        # input that would match them could only read nothing.
        for p in self.pipelines:
            for q in self.pipelines:
                if q.name in (p.name, p.prompt_from):
                    continue
                own = keys.output_glob(q.output, q.name)
                for pattern in p.streams:
                    if fnmatch.fnmatchcase(pattern.replace("*", "x"), own):
                        raise ValueError(
                            f"pipeline {p.name}: input {pattern!r} would read pipeline {q.name}'s result "
                            f"streams, which are never read as input; to run a model on them, chain it: "
                            f"prompt_from = \"{q.name}\"")
        return self


ENV_PREFIX = "SIGHTSTREAM_"
ENV_OWN = "SIGHTSTREAM_TEST_"  # the test suite's own variables, not settings


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse SIGHTSTREAM_* variables that name no setting (a misspelt one would be ignored
    silently) and one pipeline's setting set alone (the list is set as a whole, as JSON).
    Raises ConfigError naming the variable."""
    fields = set(Settings.model_fields)
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(ENV_OWN):
            continue
        first, _, rest = upper[len(ENV_PREFIX):].partition("__")
        setting = first.lower()
        if setting not in fields:
            close = difflib.get_close_matches(setting, fields, n=1)
            meant = f"{ENV_PREFIX}{close[0].upper()}" + (f"__{rest}" if rest else "") if close else ""
            hint = f"; did you mean {meant}?" if close else ""  # the whole name, nested part kept
            raise ConfigError(f"{name} names no setting{hint}")
        if setting == "pipelines" and rest:
            raise ConfigError(f"{name}: one pipeline's setting cannot be set alone; set "
                              f"{ENV_PREFIX}PIPELINES to the whole list as JSON, e.g. "
                              '\'[{"name": "people", "fps": 5}]\'')


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (the default one if present), then the environment, then overrides."""
    check_environment(os.environ)
    toml: Path | None
    if path is not None:
        toml = Path(path)
        if not toml.exists():
            raise ConfigError(f"config file {toml} does not exist")
    else:  # present, it must be readable: a directory there (Docker's bind mount of a missing
        # file makes one) or an unreadable file would otherwise run the defaults unsaid
        toml = DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    if toml is not None:
        _check_readable(toml)

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(  # type: ignore[override]
            cls, settings_cls, init_settings, env_settings, **_: Any
        ):
            sources = [init_settings, env_settings]
            if toml is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
            return tuple(sources)

    try:
        loaded = _FromFile(**overrides)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None
    except ValueError as e:  # a TOML syntax error, or a variable whose value is not JSON
        from_env = re.search(r'field "(\w+)" from source "EnvSettingsSource"', str(e))
        if from_env:
            raise ConfigError(_bad_variable(from_env.group(1))) from None
        raise ConfigError(f"cannot read {toml}: {e}" if toml else f"invalid settings: {e}") from None
    return loaded


def _check_readable(toml: Path) -> None:
    if toml.is_dir():
        raise ConfigError(f"config file {toml} is a directory, not a TOML file (a container's bind mount of "
                          "a file that did not exist makes one)")
    try:
        with toml.open("rb"):
            pass
    except OSError as e:
        raise ConfigError(f"config file {toml} cannot be read: {e.strerror or e} (this process runs as "
                          f"uid {os.getuid()}, which must be able to read it)") from None


def _bad_variable(field: str) -> str:
    prefix = f"{ENV_PREFIX}{field}".upper()
    names = sorted(k for k in os.environ if k.upper() == prefix or k.upper().startswith(prefix + "__"))
    return (f"invalid setting {field}: {' or '.join(names) or prefix} cannot be read; a list or a table "
            f"in a variable is written as JSON, e.g. {ENV_PREFIX}JOBS__ALLOWED_PATHS='[\"/srv/videos\"]'")


def describe_validation_error(e: ValidationError) -> str:
    """One line per problem, each naming the setting as a user writes it; a setting that does
    not exist gets the likeliest one it was meant to be."""
    parts = []
    for err in e.errors():
        loc = ""
        for item in err["loc"]:
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and err["loc"]:
            close = difflib.get_close_matches(str(err["loc"][-1]), _fields_at(err["loc"][:-1]), n=1)
            msg += f"; did you mean {close[0]}?" if close else ""
        parts.append(f"invalid setting {loc or '(root)'}: {msg}" if loc else f"invalid settings: {msg}")
    return "\n".join(parts)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The setting names of the settings table at `loc` (control, pipelines[0], …); [] where
    it is no table of ours (a model entry's options are free)."""
    model: Any = Settings
    for item in loc:
        if isinstance(item, int):
            continue  # a list's element: the list's own type was taken already
        field = getattr(model, "model_fields", {}).get(item)
        if field is None:
            return []
        found = [t for t in (field.annotation, *get_args(field.annotation))
                 if isinstance(t, type) and issubclass(t, BaseModel)]
        if not found:
            return []
        model = found[0]
    return list(getattr(model, "model_fields", {}))
