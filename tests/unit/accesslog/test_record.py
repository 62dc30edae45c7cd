import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safesquid_tw.accesslog.record import JSON_KEYS, AccessRecord, iso_utc_millis, strip_url_credentials


def make(**overrides):
    fields = dict(
        time=1795316839.25,
        node="node-a",
        client="10.0.0.7",
        user="alice",
        method="GET",
        url="http://example.com/path?q=1",
        status=200,
        bytes_in=321,
        bytes_out=4567,
        duration_ms=12.5,
        action="allow",
        rule="allow-office",
        category=None,
        application="search",
        policy_version=7,
        dlp=("credit-card",),
        detail=None,
    )
    fields.update(overrides)
    return AccessRecord(**fields)


def test_json_line_has_stable_keys_in_order_and_ends_in_one_newline():
    line = make().to_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert tuple(obj) == JSON_KEYS
    assert obj["time"] == "2026-11-22T03:07:19.250Z"
    assert obj["ts"] == 1795316839.25
    assert obj["dlp"] == ["credit-card"]
    assert obj["category"] is None


def test_keys_are_the_same_when_optional_fields_are_empty():
    line = make(user=None, rule=None, application=None, policy_version=None, dlp=()).to_json_line()
    assert tuple(json.loads(line)) == JSON_KEYS


def test_round_trip():
    record = make(detail="upstream connect refused", dlp=("ssn", "iban"))
    assert AccessRecord.from_json(json.loads(record.to_json_line())) == record


text = st.text(max_size=40)


@given(
    time=st.floats(min_value=0, max_value=4e9),
    user=st.none() | text,
    url=text,
    status=st.integers(100, 599),
    nbytes=st.integers(0, 2**53),
    duration=st.floats(min_value=0, max_value=1e7).map(lambda ms: round(ms, 3)),
    dlp=st.lists(text, max_size=3).map(tuple),
)
def test_round_trip_of_arbitrary_values(time, user, url, status, nbytes, duration, dlp):
    record = make(time=time, user=user, url=url, status=status, bytes_out=nbytes, duration_ms=duration, dlp=dlp)
    line = record.to_json_line()
    line.decode("ascii")  # stays ASCII whatever the input
    assert AccessRecord.from_json(json.loads(line)) == record


def test_a_line_break_in_a_value_cannot_split_the_record():
    line = make(url="http://x/\r\n{\"forged\":1}").to_json_line()
    assert line.count(b"\n") == 1


@pytest.mark.parametrize(
    "url, clean",
    [
        ("http://alice:s3cret@example.com/a", "http://example.com/a"),
        ("https://alice@example.com:8443/?x=1", "https://example.com:8443/?x=1"),
        ("ftp://u:p@w@host/file", "ftp://host/file"),
        ("http://example.com/user@host/path", "http://example.com/user@host/path"),
        ("http://example.com/?email=a@b.c", "http://example.com/?email=a@b.c"),
        ("http://example.com#frag@x", "http://example.com#frag@x"),
        ("http://u:p@host", "http://host"),
        ("example.com:443", "example.com:443"),
        ("user@example.com:443", "user@example.com:443"),
        ("http://example.com/plain?q=1", "http://example.com/plain?q=1"),
        ("", ""),
    ],
)
def test_credentials_never_reach_the_record(url, clean):
    assert strip_url_credentials(url) == clean
    record = make(url=url)
    assert record.url == clean
    assert b"s3cret" not in record.to_json_line()


def test_from_json_strips_credentials_too():
    obj = json.loads(make().to_json_line())
    obj["url"] = "http://bob:hunter2@example.com/"
    assert AccessRecord.from_json(obj).url == "http://example.com/"


def test_unknown_keys_are_ignored_on_read():
    obj = json.loads(make().to_json_line())
    obj["added_in_a_later_version"] = 1
    assert AccessRecord.from_json(obj) == make()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("ts", None, "'ts' must be a finite number"),
        ("ts", "yesterday", "'ts' must be a finite number"),
        ("status", "200", "'status' must be an integer"),
        ("status", True, "'status' must be an integer"),
        ("node", 5, "'node' must be a string"),
        ("user", 5, "'user' must be a string or null"),
        ("policy_version", 1.5, "'policy_version' must be an integer"),
        ("dlp", "ssn", "'dlp' must be a list of strings"),
        ("dlp", [1], "'dlp' must be a list of strings"),
    ],
)
def test_from_json_rejects_bad_fields(key, value, message):
    obj = json.loads(make().to_json_line())
    obj[key] = value
    with pytest.raises(ValueError, match=message):
        AccessRecord.from_json(obj)


@pytest.mark.parametrize("missing", ["ts", "node", "status", "url"])
def test_from_json_rejects_missing_fields(missing):
    obj = json.loads(make().to_json_line())
    del obj[missing]
    with pytest.raises(ValueError, match=f"'{missing}' is missing"):
        AccessRecord.from_json(obj)


def test_non_finite_values_cannot_be_encoded():
    with pytest.raises(ValueError):
        make(duration_ms=math.nan).to_json_line()


@pytest.mark.parametrize(
    "epoch, text",
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1795316839.999, "2026-11-22T03:07:19.999Z"),
        (1795316840.0, "2026-11-22T03:07:20.000Z"),
        (1795316839.5, "2026-11-22T03:07:19.500Z"),
    ],
)
def test_iso_time(epoch, text):
    assert iso_utc_millis(epoch) == text


def test_duration_is_written_to_the_microsecond():
    assert json.loads(make(duration_ms=1.23456789).to_json_line())["duration_ms"] == 1.235
