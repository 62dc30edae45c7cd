"""The parent <-> worker framing: whole messages whatever the chunking; garbage refused."""

from __future__ import annotations

import pytest

from safesquid_tw.workers.frames import MAX_FRAME, FrameError, FrameReader, encode


def test_messages_survive_any_chunking():
    got = []
    reader = FrameReader(got.append)
    data = encode({"t": "rec", "r": {"url": "http://a.test/é"}}) + encode({"t": "status", "connections": 3})
    for i in range(len(data)):
        reader.feed(data[i:i + 1])
    assert got == [{"t": "rec", "r": {"url": "http://a.test/é"}}, {"t": "status", "connections": 3}]


@pytest.mark.parametrize("data", [
    (MAX_FRAME + 1).to_bytes(4, "big"),
    (3).to_bytes(4, "big") + b"{x}",
    (2).to_bytes(4, "big") + b"[]",
])
def test_what_is_not_a_frame_is_refused(data):
    with pytest.raises(FrameError):
        FrameReader(lambda m: None).feed(data)
