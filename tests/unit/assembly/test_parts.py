"""Parts every role is built from, on a fake clock."""

from twisted.internet.task import Clock

from safesquid_tw.assembly.parts import NodeStateService
from safesquid_tw.config import NodeConfig
from safesquid_tw.nodestate import NodeState


def test_the_node_is_marked_started_at_its_clocks_time():
    clock = Clock()
    clock.advance(1_795_300_000.0)
    state = NodeState(role="standalone", node="n1")
    service = NodeStateService(state, NodeConfig(node_name="n1"), clock)
    clock.advance(5.0)
    service.startService()
    assert state.started == 1_795_300_005.0
