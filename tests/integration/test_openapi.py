"""/openapi.json: a valid OpenAPI 3.1 document that describes every route, and the app honours
it. Schemathesis sends generated requests to every operation of the real app (a daemon on the
suite's redis-server, served from a thread of its own: schemathesis' calls block) and checks
each answer: no server error, a documented status, a body that matches its schema."""

from __future__ import annotations

import asyncio
import json
import threading

import hypothesis
import pytest
import schemathesis
from aiohttp import web
from openapi_spec_validator import validate

from sightstream.control.app import APIS, make_app
from sightstream.control.openapi import document
from sightstream.daemon.daemon import Daemon
from tests.integration.helpers import settings_for

pytestmark = pytest.mark.integration
TOKEN = "schema-token"


class AppThread:
    """The control plane and its daemon, running on an event loop in a thread of their own."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)

    async def _start(self) -> str:
        self.daemon = Daemon(self.settings, host="schema", discover_s=0.2)
        await self.daemon.start()
        self.runner = web.AppRunner(make_app(self.daemon), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.daemon.stop()

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served(redis_server, tmp_path_factory):
    settings = settings_for(redis_server.url, tmp_path_factory.mktemp("schema"), [
        {"name": "people"},
        {"name": "asked", "model": "fake/echo", "prompt": "cats", "input": ["asked:*"]},
    ], fakes={"echo": {"adapter": "Echo"}, "small": {}}, control={"port": 0, "token": TOKEN})
    with AppThread(settings) as url:
        yield url


async def test_the_document_is_valid_openapi_3_1_and_covers_every_route(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path, control={"port": 0, "token": "t"})
    doc = document(APIS, token=True)
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    daemon = Daemon(settings)
    app = make_app(daemon)
    await daemon.stop()
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented
    # Auth is described: every route needs the token but health and metrics.
    assert doc["paths"]["/health/live"]["get"]["security"] == []
    assert "401" in doc["paths"]["/pipelines/{name}/prompt"]["put"]["responses"]
    assert "security" not in doc["paths"]["/pipelines/{name}/prompt"]["put"]
    # Bounds are JSON Schema's own keywords (pydantic's ge/le would be ignored by clients).
    text = json.dumps(doc)
    assert not any(f'"{k}":' in text for k in ("ge", "gt", "le", "lt"))
    assert '"maximum": 1000000000, "minimum": 1, "type": "integer"' in text  # a job's max_frames
    # /predict's answers: JSON (one result, or a batch), a PNG, packed bits; and their headers
    ok = doc["paths"]["/predict/{family}/{variant}"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "image/png", "application/octet-stream"}
    assert len(ok["content"]["application/json"]["schema"]["oneOf"]) == 2
    assert {"X-Model", "X-Task", "X-Batch-Size", "X-Depth-Min", "X-Depth-Max"} <= set(ok["headers"])


# schemathesis' pytest loader (`from_fixture`) does not run on pytest 9 (it sets a node's
# `_nodeid`, which pytest no longer has): each operation's strategy is driven by hypothesis here.
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_every_operation_honours_the_schema(served, mode):
    # A request the schema allows may still be refused for what it means, with a documented
    # status (a prompt the model cannot use: 422; a model whose weights are absent: 409;
    # a random body that is not an image: 415): never 400, never 5xx.
    config = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "401", "404", "409", "413", "415", "422", "503", "504", "507"]}}})
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json", config=config,
                                           headers={"Authorization": f"Bearer {TOKEN}"})
    # Requests that break the schema: the answer must still be a 4xx, never a server error.
    # (Unknown query parameters are ignored by design, and aiohttp itself answers over-long
    # URLs with a plain-text 400 before the app sees them: only the server-error check runs.)
    checks = None if mode == schemathesis.GenerationMode.POSITIVE else [schemathesis.checks.not_a_server_error]
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        # Derandomized: the same cases on every run, so CI is not at the mercy of chance.
        @hypothesis.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy(mode))
        def check(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks, timeout=30)

        try:
            check()
        except hypothesis.errors.Unsatisfiable:
            assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing in it can be wrong
        except (Exception, BaseExceptionGroup) as e:  # every operation's failures, reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
