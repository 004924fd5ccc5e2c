"""Every Redis key sightstream reads or writes is named here, and nowhere else.

Keys derived from a source keep the source's `{hash tag}`: a camera's frames, results,
dead-letters and sampling keys then live in one Redis Cluster slot, which the ack-then-publish
Lua script needs (it touches the input and the output stream in one call).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

DEFAULT_OUTPUT = "results:{pipeline}:{source}"
DEADLETTER = "deadletter:{pipeline}:{source}"
INTERNAL_PREFIX = "sightstream:"


def group(pipeline: str) -> str:
    """A pipeline is one consumer group, named after it."""
    return pipeline


def result_stream(template: str, pipeline: str, source: str) -> str:
    return template.format(pipeline=pipeline, source=source)


def deadletter_stream(pipeline: str, source: str) -> str:
    return DEADLETTER.format(pipeline=pipeline, source=source)


def input_job_id(pipeline: str, url: str) -> str:
    """The job of a pipeline's video input: the same id on every daemon of the group."""
    return hashlib.sha1(f"{pipeline}\n{url}".encode()).hexdigest()[:20]


def public_url(url: str) -> str:
    """A video URL as results, stream names, logs and the API show it: without its user and
    password (a camera's rtsp://user:password@…) and with a password or token in its query
    masked: those are for opening it alone. Anything but an http(s)/rtsp(s) URL is as it is."""
    if not url.lower().startswith(("http://", "https://", "rtsp://", "rtsps://")):
        return url
    scheme, _, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    _, colon, port = authority.rpartition(":")
    cut_short = colon and not port.isdigit() and not authority.startswith("[")  # not host:port
    if cut_short and "@" not in authority and "@" in rest:
        # "user:pass" cut short by a /, ? or # in the password (cameras' "Admin#2024"): what a
        # URL parser takes for the host part is no host:port, and it would show the rest. All
        # up to the first @ goes. (A password of digits before the / ? or # reads as a port:
        # such a URL is not told apart from a host's, and shows.)
        url = f"{scheme}://{rest[rest.index('@') + 1:]}"
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc, query=mask_query_secrets(parts.query)))


def url_error(error: ValueError) -> str:
    """urllib's or redis-py's reason a URL cannot be read, safe to show: one whose port is not a
    number quotes the "port", often the end of a password holding an unencoded delimiter."""
    if "could not be cast" in str(error):
        return ("its port is not a number (a password holding # ? / or @ must be percent-encoded: "
                "%23 %3F %2F %40)")
    return str(error)


# Query parameters that carry a secret, by name: a password (cameras take ?user=…&password=…),
# a token, a key or a signature (signed URLs: S3's X-Amz-Signature and X-Amz-Security-Token,
# Azure's sig, CloudFront's Signature, Akamai's hdnts and hdnea), or an auth value.
# A name is read percent-decoded (`%74oken` is `token`).
_SECRET_NAME = re.compile(
    r"(?:pass(?:word|wd)?|pwd|token|secret|sig(?:nature)?|credential|api_?key|hdnts|hdnea|"
    r"(?<![a-z])(?:key|auth|pw))$", re.IGNORECASE)
_PARAM = re.compile(r"((?:^|[?&;])([^=&;?#]*)=)([^&;#]*)")


def mask_query_secrets(text: str) -> str:
    """`text` (a query, or a whole URL) with the values of secret parameters as `***`."""
    return _PARAM.sub(lambda m: m.group(1) + "***" if _SECRET_NAME.search(unquote_plus(m.group(2)))
                      else m.group(0), text)


def video_input_source(pipeline: str, url: str, cluster: bool) -> str:
    """The source key in a pipeline's video input's stream names: its public URL. On a Redis
    Cluster, the input's job's hash tag `{<id>}` comes first, so its results and dead-letters
    share the job's slot: the job's fenced scripts write them beside its hash."""
    shown = public_url(url)
    return f"{{{input_job_id(pipeline, url)}}}{shown}" if cluster else shown


def sample_key(pipeline: str, source: str, bucket: int) -> str:
    """First-frame-wins marker of one FPS time bucket of one source (shared by all daemons)."""
    return f"{INTERNAL_PREFIX}sample:{pipeline}:{source}:{bucket}"


def recorded_marker(pipeline: str, source: str, entry_id: str) -> str:
    """Set once a dead-letter record has been written for an entry that was no longer pending,
    so a retried publish round cannot write it twice."""
    return f"{INTERNAL_PREFIX}recorded:{pipeline}:{source}:{entry_id}"


def consumer_slot(host: str, slot: int | str) -> str:
    """Lease that makes `host:slot` a stable consumer name across restarts ("*", "*": every
    daemon's, to count them)."""
    return f"{INTERNAL_PREFIX}consumer:{host}:{slot}"


def source_lease(pipeline: str, stream: str) -> str:
    """Held by the one daemon that reads `stream` for a pipeline whose model keeps state per
    source (tracking)."""
    return f"{INTERNAL_PREFIX}source:{pipeline}:{stream}"


def source_member(pipeline: str, consumer: str) -> str:
    """A daemon serving such a pipeline: the streams are shared among these."""
    return f"{INTERNAL_PREFIX}member:{pipeline}:{consumer}"


def video_member(pipeline: str, consumer: str) -> str:
    """A daemon whose config lists `pipeline`'s video inputs: the inputs are shared among these
    ("*": every such daemon's, to count them)."""
    return f"{INTERNAL_PREFIX}video-member:{pipeline}:{consumer}"


def source_incoming(pipeline: str, consumer: str) -> str:
    """Held for a while by the one daemon handing `consumer` a stream: no other hands it one
    meanwhile (its published load does not show the stream yet)."""
    return f"{INTERNAL_PREFIX}handover:{pipeline}:{consumer}"


PROMPT_CHANNEL = f"{INTERNAL_PREFIX}prompts"  # pub/sub: a pipeline's name when its prompt changed


def prompt_current(pipeline: str) -> str:
    """A hash: the pipeline's prompt now (text, version, updated_at, set_by)."""
    return f"{INTERNAL_PREFIX}prompt:{{{pipeline}}}"


def prompt_history(pipeline: str) -> str:
    """A list, append-only: every version of the pipeline's prompt as JSON, version k at k - 1.
    Shares the current hash's hash tag, so one script can update both (Redis Cluster)."""
    return f"{INTERNAL_PREFIX}prompt:{{{pipeline}}}:history"


JOBS_INDEX = f"{INTERNAL_PREFIX}jobs"  # a sorted set of every job id (same score: by id, by time)
JOBS_ACTIVE = f"{INTERNAL_PREFIX}jobs:active"  # a set: jobs pending or running
JOBS_CHANNEL = f"{INTERNAL_PREFIX}jobs"  # pub/sub: "new:<id>", "cancel:<id>", "done:<id>"


def job(job_id: str) -> str:
    """A hash: the job's spec, status, counts, timings and checkpoint. A job's keys share the
    hash tag `{<id>}`, so its fenced scripts touch one Redis Cluster slot."""
    return f"{INTERNAL_PREFIX}job:{{{job_id}}}"


def job_submission(idempotency_key: str) -> str:
    """A string: "<job id> <request digest>", the job a client's Idempotency-Key made (kept as
    long as finished jobs are). The client's key is hashed: any text, one short Redis key."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"{INTERNAL_PREFIX}job-submission:{digest}"


def job_lease(job_id: str) -> str:
    """Held by the one daemon running the job (its token fences every write)."""
    return f"{INTERNAL_PREFIX}job:{{{job_id}}}:lease"


def job_results(job_id: str) -> str:
    return f"results:job:{{{job_id}}}"


def job_deadletter(job_id: str) -> str:
    return f"deadletter:job:{{{job_id}}}"


def output_glob(template: str, pipeline: str) -> str:
    """A glob matching every stream a pipeline writes (its results for any source)."""
    return template.replace("{pipeline}", pipeline).replace("{source}", "*")


def source_of(template: str, pipeline: str, stream: str) -> str | None:
    """The source whose results `stream` holds, under a pipeline's output template (the
    inverse of result_stream); None if the template does not name it this way."""
    if "{source}" not in template:
        return None
    pattern = re.escape(template).replace(re.escape("{pipeline}"), re.escape(pipeline))
    match = re.fullmatch(pattern.replace(re.escape("{source}"), "(.+)", 1), stream)
    return match.group(1) if match else None


# Result streams under the default output prefix, whichever pipeline or deployment wrote them.
RESULTS_GLOB = "results:*:*"


def is_own_output(key: str, output_globs: list[str]) -> bool:
    """True for result, dead-letter and internal keys: never read them back as input. Jobs'
    results are never input; other result streams are excluded by `output_globs` (a chained
    pipeline's upstream's are left out of them: it reads those)."""
    if key.startswith((INTERNAL_PREFIX, "deadletter:", "results:job:")):
        return True
    return any(fnmatch.fnmatchcase(key, g) for g in output_globs)
