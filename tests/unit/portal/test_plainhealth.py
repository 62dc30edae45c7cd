"""Plain HTTP from other hosts reaches /health (and OPTIONS /) and nothing else."""

import json

import pytest_twisted
from treq.testing import StubTreq

from safesquid_tw.nodestate import NodeState
from safesquid_tw.portal.plainhealth import HealthOnlyRoot


def client(ready=True):
    state = NodeState(role="slave", node="n1", policy_version=3 if ready else None)
    return StubTreq(HealthOnlyRoot(state))


@pytest_twisted.ensureDeferred
async def test_health_is_served():
    response = await client().get("http://10.0.0.5:8888/health")
    assert response.code == 200
    body = json.loads(await response.content())
    assert body["node"] == "n1" and body["ready"] is True


@pytest_twisted.ensureDeferred
async def test_health_says_503_when_not_ready():
    response = await client(ready=False).get("http://10.0.0.5:8888/health")
    assert response.code == 503


@pytest_twisted.ensureDeferred
async def test_options_root_answers_readiness():
    assert (await client().request("OPTIONS", "http://10.0.0.5:8888/")).code == 200
    assert (await client(ready=False).request("OPTIONS", "http://10.0.0.5:8888/")).code == 503


@pytest_twisted.ensureDeferred
async def test_everything_else_points_to_https():
    for path in ("/", "/api/v1/cluster", "/static/style.css"):
        response = await client().get("http://10.0.0.5:8888" + path)
        assert response.code == 400
        assert b"HTTPS" in await response.content()
