"""The core cases against a 3-master Redis Cluster started by the test on 127.0.0.1: publish
then results, two daemons sharing the work, sampling across daemons, a daemon killed -9 and
its frames reclaimed, dead-letters, and sources that cannot be served on a cluster."""

from __future__ import annotations

import asyncio
import os
import signal
import traceback

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot
from structlog.testing import capture_logs

from sightstream.errors import ConfigError, SightstreamError
from tests.conftest import encode
from tests.e2e.daemons import Daemon, wait_until
from tests.integration.helpers import client_for, running, settings_for, wait_for
from tests.redis_cluster import LocalCluster

pytestmark = pytest.mark.integration
SOURCES = [f"frames:{{cam{i}}}" for i in range(6)]


@pytest.fixture(scope="module")
def cluster():
    try:
        with LocalCluster() as c:
            yield c
    except SightstreamError as e:
        pytest.skip(f"redis-server cannot run a local cluster here: {e}")


@pytest.fixture
def rc(cluster):
    cluster.flushall()
    client = RedisCluster.from_url(cluster.url)
    yield client
    client.close()


def cluster_settings(cluster, tmp_path, pipelines=None, **extra):
    return settings_for(cluster.url, tmp_path, pipelines, redis_cluster=True, **extra)


def outcomes(rc, sources=SOURCES) -> list[tuple[str, str]]:
    out = []
    for s in sources:
        for key in (f"results:people:{s}", f"deadletter:people:{s}"):
            out += [(f[b"source"].decode(), f[b"frame_id"].decode()) for _, f in rc.xrange(key)]
    return out


def spread_over_nodes(rc, keys: list[str]) -> int:
    return len({rc.nodes_manager.get_node_from_slot(key_slot(k.encode())).name for k in keys})


async def test_two_daemons_publish_every_result_once_across_the_nodes(cluster, rc, tmp_path, gradient):
    assert spread_over_nodes(rc, SOURCES) >= 2  # the sources really live on several nodes
    jpeg = encode(gradient)
    sent = {(s, rc.xadd(s, {"image": jpeg}).decode()) for _ in range(10) for s in SOURCES}
    bad = ("frames:{cam0}", rc.xadd("frames:{cam0}", {"image": b"not an image"}).decode())
    settings = cluster_settings(cluster, tmp_path, [{"batch_size": 4, "max_in_flight": 8}])
    async with running(settings, host="a") as a, running(settings, host="b") as b:
        await wait_for(lambda: len(outcomes(rc)) == 61, what="61 outcomes")
        assert a.publisher.published > 0 and b.publisher.published > 0
    done = outcomes(rc)
    assert len(done) == len(set(done)) == 61 and set(done) == sent | {bad}
    (dead,) = rc.xrange("deadletter:people:frames:{cam0}")
    assert dead[1][b"reason"] == b"unsupported_format"
    assert all(rc.xpending(s, "people")["pending"] == 0 for s in SOURCES)


async def test_tracked_sources_are_shared_by_leases_across_the_nodes(cluster, rc, tmp_path, gradient):
    """Source leases (one daemon per tracked source) read and write keys of many slots."""
    jpeg = encode(gradient)
    sent = {(s, rc.xadd(s, {"image": jpeg}).decode()) for _ in range(3) for s in SOURCES}
    settings = cluster_settings(cluster, tmp_path, [{"name": "people", "model": "fake/track"}],
                                fakes={"track": {"task": "track", "claims_task": "track"}})
    async with running(settings, host="a") as a, running(settings, host="b") as b:
        await wait_for(lambda: len(outcomes(rc)) == len(sent), what="every frame's result")
        await wait_for(lambda: all(len(d.runs["people"].ingest.streams) == 3 for d in (a, b)), what="3 each")
        assert not set(a.runs["people"].ingest.streams) & set(b.runs["people"].ingest.streams)
    assert set(outcomes(rc)) == sent and len(outcomes(rc)) == len(sent)


async def test_sampling_holds_across_daemons(cluster, rc, tmp_path, gradient):
    jpeg = encode(gradient)
    start = 1_700_000_000_000
    for i in range(100):  # 5 s of capture time at 20 fps
        rc.xadd("frames:{cam}", {"image": jpeg, "ts": start + i * 50})
    settings = cluster_settings(cluster, tmp_path, [{"fps": 2, "batch_size": 2, "max_in_flight": 4}])
    async with running(settings, host="a"), running(settings, host="b"):
        await wait_for(lambda: rc.xinfo_groups("frames:{cam}")[0]["pending"] == 0
                       and rc.xinfo_groups("frames:{cam}")[0]["lag"] == 0
                       and rc.xlen("results:people:frames:{cam}") >= 10)
    results = rc.xrange("results:people:frames:{cam}")
    assert len(results) == 10  # 2 per second of capture time, for both daemons together
    assert len({int(f[b"ts"]) * 2 // 1000 for _, f in results}) == 10


async def test_a_source_whose_results_would_be_in_another_slot_is_not_read(cluster, rc, tmp_path, gradient):
    jpeg = encode(gradient)
    rc.xadd("frames:cam9", {"image": jpeg})  # no hash tag: its results would hash elsewhere
    rc.xadd("frames:{ok}", {"image": jpeg})
    with capture_logs() as logs:
        async with running(cluster_settings(cluster, tmp_path)) as d:
            await wait_for(lambda: rc.xlen("results:people:frames:{ok}") == 1, what="the tagged source")
            assert "frames:cam9" not in d.runs["people"].ingest.streams
            assert (failed := d.failed()) is None, "".join(traceback.format_exception(failed))
    (refused,) = [e for e in logs if e["event"] == "stream_not_read_on_cluster"]
    assert refused["stream"] == "frames:cam9" and "hash tag" in refused["reason"]
    assert rc.xlen("frames:cam9") == 1 and not rc.exists("results:people:frames:cam9")


async def test_a_video_input_runs_on_a_cluster_in_its_job_s_slot(cluster, rc, tmp_path):
    """A pipeline's video input is a job: its results and dead-letters are named with the job's
    hash tag, so its fenced scripts write them beside the job's hash."""
    from sightstream.daemon.daemon import Daemon as InProcess
    from sightstream.keys import input_job_id
    from tests import hls

    hls.make_clip(tmp_path / "clip.mp4", seconds=2, fps=10)
    url = f"file://{tmp_path}/clip.mp4"
    settings = cluster_settings(cluster, tmp_path, [{"input": ["frames:{cam0}", url], "fps": 2}])
    job_id = input_job_id("people", url)
    results = f"results:people:{{{job_id}}}{url}"
    async with running(settings):
        await wait_for(lambda: rc.xlen(results) == 4, 30, "the video's 4 results")
    assert key_slot(results.encode()) == key_slot(f"sightstream:job:{{{job_id}}}".encode())
    fields = [f for _, f in rc.xrange(results)]
    assert {f[b"source"] for f in fields} == {url.encode()} and not rc.exists(f"results:people:{url}")
    assert rc.hget(f"sightstream:job:{{{job_id}}}", "deadletter") == f"deadletter:people:{{{job_id}}}{url}".encode()

    elsewhere = cluster_settings(cluster, tmp_path, [{"input": [url], "output": "out:{{shard}}:{source}"}])
    with pytest.raises(ConfigError, match="must share its job's slot"):
        InProcess(elsewhere)


@pytest.mark.timeout(120)
def test_a_daemon_killed_mid_batch_loses_and_doubles_nothing(cluster, rc, tmp_path, gradient):
    jpeg = encode(gradient)
    sources = SOURCES[:3]
    sent = {(s, rc.xadd(s, {"image": jpeg}).decode()) for _ in range(60) for s in sources}
    config = dict(pipeline="model = \"fake/slow\"\nbatch_size = 4\nmax_in_flight = 16",
                  fake="delay_s = 0.2", top="redis_cluster = true")
    group = [Daemon(tmp_path, cluster.url, name=f"d{i}", **config) for i in range(3)]
    try:
        for d in group:
            d.wait_ready()
        wait_until(lambda: len(outcomes(rc, sources)) >= 40, 60, "some results")
        victim = group[1]
        os.kill(victim.proc.pid, signal.SIGKILL)  # mid-batch, with frames in flight
        victim.proc.wait()
        wait_until(lambda: len(outcomes(rc, sources)) >= 180, 90, "every frame's outcome")
        done = outcomes(rc, sources)
        assert len(done) == len(set(done)) == 180 and set(done) == sent
        assert all(rc.xpending(s, "people")["pending"] == 0 for s in sources)
        reclaimed = sum(d.get("/health")[1]["pipelines"][0]["reclaimed"] for d in (group[0], group[2]))
        assert reclaimed > 0  # the dead daemon's frames were taken over
    finally:
        for d in group:
            d.close()


async def test_the_cluster_setting_must_match_the_server(cluster, redis_url, tmp_path):
    """A cluster node without `redis_cluster = true`, or the setting on a plain Redis, is a
    configuration error at start, saying which."""
    with pytest.raises(ConfigError, match="is a Redis Cluster node: set redis_cluster = true"):
        async with running(settings_for(cluster.url, tmp_path)):
            pass
    with pytest.raises(ConfigError, match="is not a Redis Cluster node"):
        async with running(settings_for(redis_url, tmp_path, redis_cluster=True)):
            pass


async def test_publish_and_tail_work_on_a_cluster(cluster, rc, tmp_path, gradient):
    import asyncio

    from PIL import Image

    from sightstream.publish import publish
    from sightstream.tail import tail

    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(gradient).save(folder / f"{i}.jpg")
    for source in ("frames:{cam0}", "frames:{cam1}"):
        assert publish(cluster.url, str(folder), source, fps=0, progress=False, cluster=True) == 3
    async with running(cluster_settings(cluster, tmp_path)):
        await wait_for(lambda: len(outcomes(rc, ["frames:{cam0}", "frames:{cam1}"])) == 6, what="6 results")
    lines: list[str] = []
    printed = await asyncio.to_thread(tail, cluster.url, "results:people:*", start="0", count=6,
                                      timeout_s=10, emit=lines.append, cluster=True)
    assert printed == 6 and {line.split()[0] for line in lines} == {
        "results:people:frames:{cam0}", "results:people:frames:{cam1}"}


async def test_a_file_job_runs_on_a_cluster(cluster, rc, tmp_path):
    """A job's keys share its `{id}` tag, so its fenced scripts run on a cluster; the new-job
    notice is published outside the pipeline, which a cluster pipeline refuses."""
    from tests import hls
    from tests.integration.helpers import serving
    from tests.integration.test_jobs import submit, until_status

    hls.make_clip(tmp_path / "clip.mp4", seconds=2, fps=10)
    settings = cluster_settings(cluster, tmp_path, jobs={"allowed_paths": [str(tmp_path)], "poll_s": 0.2})
    async with serving(settings) as (d, client):
        job_id = await submit(client, source=f"file://{tmp_path}/clip.mp4", fps=5, max_frames=4)
        job = await until_status(client, job_id, "completed")
    assert job["counts"]["processed"] == 4
    assert rc.xlen(f"results:job:{{{job_id}}}") >= 4


async def test_a_cluster_outage_is_waited_out_and_health_says_so(tmp_path, gradient):
    """A master lost with no replica to promote: the cluster is down. Every daemon exited
    (a cluster pipeline leaves connection errors among its replies, where the publisher and
    the backlog gauges took them for replies), and /health/ready said ready throughout (the
    node asked still answers PING). Now the daemon waits, says it, and goes on afterwards."""
    try:
        own = LocalCluster().start()
    except SightstreamError as e:
        pytest.skip(f"redis-server cannot run a local cluster here: {e}")
    client = RedisCluster.from_url(own.url)
    jpeg = encode(gradient)
    try:
        settings = cluster_settings(own, tmp_path, [{"model": "fake/slow", "batch_size": 6, "batch_timeout_ms": 200}],
                                    fakes={"slow": {"delay_s": 1.5}})
        async with running(settings) as d:
            http = await client_for(d)
            try:
                lost = own.nodes[2]
                on_lost = {s for s in SOURCES if client.nodes_manager.get_node_from_slot(
                    key_slot(s.encode())).port == lost.port}
                assert on_lost and len(on_lost) < len(SOURCES)
                # in flight while the node goes: their results are written during the outage
                during = {(s, client.xadd(s, {"image": jpeg}).decode()) for s in SOURCES}
                await wait_for(lambda: d.workers[0].busy, what="the batch in flight")
                lost.stop()  # its slots are served by nobody: CLUSTERDOWN everywhere
                await wait_for(lambda: _state(own.nodes[0].port) == "fail", 20, "the cluster to fail")
                await asyncio.sleep(3)  # reads, reclaims, heartbeats, gauges and publishes all fail meanwhile
                assert (failed := d.failed()) is None, "".join(traceback.format_exception(failed))
                r = await http.get("/health/ready")
                assert r.status == 503
                (problem,) = (await r.json())["problems"]
                assert problem.startswith("the Redis Cluster is down or unreachable"), problem
                lost.start()  # the same node (its nodes.conf kept): the cluster mends, its data gone
                await wait_for(lambda: all(_state(n.port) == "ok" for n in own.nodes), 30, "the cluster to mend")
                client.close()
                client = RedisCluster.from_url(own.url)
                later = {(s, client.xadd(s, {"image": jpeg}).decode()) for s in SOURCES}
                kept = {f for f in during if f[0] not in on_lost} | later
                await wait_for(lambda: set(outcomes(client)) >= kept, 60, "every result but the lost node's")
                assert d.failed() is None and (await http.get("/health/ready")).status == 200
            finally:
                await http.close()
        done = outcomes(client)
        assert len(done) == len(set(done))
    finally:
        client.close()
        own.close()


def _state(port: int) -> str:
    import redis

    with redis.Redis(port=port, socket_timeout=1) as node:
        try:
            return str(node.cluster("info").get("cluster_state"))
        except redis.RedisError:
            return "unreachable"


async def test_a_cluster_whose_seed_node_is_down_at_start_is_waited_for(tmp_path):
    """It was taken for a plain Redis: 'invalid setting redis_cluster: … is not a Redis Cluster
    node (… Error 111 connecting …)', exit 2, so a daemon restarted during an outage stayed down."""
    from sightstream.daemon.daemon import Daemon as InProcess
    from sightstream.daemon.embedded_redis import free_port

    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0", tmp_path, redis_cluster=True)
    d = InProcess(settings)
    with capture_logs() as logs:
        starting = asyncio.create_task(d.start())
        await asyncio.sleep(1.5)
        assert not starting.done()  # still retrying, not refused
        await d.stop()
        await asyncio.wait_for(starting, 5)
    assert any(e["event"] == "redis_unreachable" and e.get("op") == "start" for e in logs)
