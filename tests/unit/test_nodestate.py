import pytest

from safesquid_tw.nodestate import NodeState


@pytest.mark.parametrize(
    "changes, ready, status",
    [
        ({}, False, "starting"),
        ({"policy_version": 3}, True, "ready"),
        ({"policy_version": 0}, True, "ready"),
        ({"policy_version": 3, "draining": True}, False, "draining"),
        ({"policy_version": 3, "shutting_down": True}, False, "stopping"),
        ({"draining": True, "shutting_down": True}, False, "stopping"),
    ],
)
def test_readiness(changes, ready, status):
    state = NodeState(role="slave", node="n1", **changes)
    assert state.ready is ready
    assert state.status == status
    assert state.as_health_json()["ready"] is ready


def test_health_json():
    state = NodeState(
        role="standalone", node="gw1", policy_version=4, policy_digest="sha256:ab",
        policy_source="file", started=1000.0, now=lambda: 1062.5, policy_since=1060.0,
    )
    state.health_parts["spool"] = lambda: {"backlog_records": 3}
    assert state.as_health_json() == {
        "role": "standalone",
        "node": "gw1",
        "ready": True,
        "status": "ready",
        "policy_version": 4,
        "policy_digest": "sha256:ab",
        "policy_source": "file",
        "draining": False,
        "uptime_s": 62.5,
        "policy_age_s": 2.5,
        "spool": {"backlog_records": 3},
    }


def test_uptime_is_unknown_before_start():
    assert NodeState(role="master", node="m").as_health_json()["uptime_s"] is None


def test_state_is_mutable():
    state = NodeState(role="slave", node="n1")
    state.policy_version = 9
    state.policy_source = "master"
    assert state.ready
