"""The portal's pure parts and small stores, by tables: sessions, throttle, form mapping, allow
list, startup parameters, CSV cells, backups."""

from __future__ import annotations

import pytest

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.portal import sections as S
from safesquid_tw.portal.allowlist import address_in, portal_networks
from safesquid_tw.portal.backup import BackupError, check_backup
from safesquid_tw.portal.csvexport import cell, csv_bytes
from safesquid_tw.portal.diffview import classify, document_diff
from safesquid_tw.portal.sessions import SessionStore
from safesquid_tw.portal.startup import StartupParamError, StartupParams, check_params
from safesquid_tw.portal.throttle import LoginThrottle
from safesquid_tw.portal.web import safe_next


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sessions_have_distinct_random_ids_and_csrf_tokens():
    store = SessionStore(FakeClock())
    first, second = store.create("a", "1.2.3.4"), store.create("a", "1.2.3.4")
    assert first.id != second.id and first.csrf != second.csrf and first.id != first.csrf
    assert len(first.id) >= 43
    assert store.get(first.id) is first and store.get("nope") is None and store.get(None) is None


def test_sessions_are_capped():
    clock = FakeClock()
    store = SessionStore(clock, max_sessions=3)
    made = []
    for i in range(5):
        clock.now = i
        made.append(store.create("a", "x"))
    assert len(store) == 3
    assert store.get(made[0].id) is None and store.get(made[4].id) is made[4]


def test_end_account_keeps_the_current_session():
    store = SessionStore(FakeClock())
    keep, other = store.create("a", "x"), store.create("a", "y")
    bob = store.create("b", "z")
    assert store.end_account("a", keep=keep.id) == 1
    assert store.get(keep.id) and store.get(other.id) is None and store.get(bob.id)


def test_flashes_are_shown_once():
    session = SessionStore(FakeClock()).create("a", "x")
    session.flash("ok", "done")
    assert session.take_flashes() == [("ok", "done")] and session.take_flashes() == []


@pytest.mark.parametrize("failures, wait", [(0, 0), (1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (20, 60)])
def test_account_delay_grows_and_is_capped(failures, wait):
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for i in range(failures):
        throttle.failed("admin", f"10.0.0.{i}")  # every try from elsewhere: only the account counts
    assert throttle.wait("admin", "10.9.9.9") == wait


def test_failures_are_forgotten_after_a_quiet_hour():
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(5):
        throttle.failed("admin", "10.0.0.1")
    clock.now = 3600
    assert throttle.wait("admin", "10.0.0.1") == 0
    assert throttle.failed("admin", "10.0.0.1") == 1


def test_throttle_tracks_a_bounded_number_of_keys():
    clock = FakeClock()
    throttle = LoginThrottle(clock, max_tracked=10)
    for i in range(100):
        clock.now = i * 0.01
        throttle.failed(f"user{i}", f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._accounts) <= 10 and len(throttle._addresses) <= 10


@pytest.mark.parametrize("target, safe", [
    ("/policy", "/policy"), ("/reports?period=day", "/reports?period=day"), ("//evil.test/", "/"),
    ("https://evil.test/", "/"), ("/\\evil.test", "/"), ("", "/"), ("/x\r\nSet-Cookie: a=b", "/"),
])
def test_safe_next(target, safe):
    assert safe_next(target) == safe


RULES = S.SECTIONS_BY_SLUG["access"].lists[0]


@pytest.mark.parametrize("values, item, errors", [
    ({"name": "r", "action": "deny", "enabled": True, "clients": "10.0.0.0/8\r\n\r\n 192.0.2.1 "},
     {"name": "r", "action": "deny", "enabled": True, "clients": ["10.0.0.0/8", "192.0.2.1"]}, {}),
    ({"name": "r", "action": "allow", "enabled": False, "ports": "80\n8000-8100", "users": ["alice"]},
     {"name": "r", "action": "allow", "enabled": False, "ports": [80, "8000-8100"], "users": ["alice"]}, {}),
    ({"name": "r", "action": "deny", "enabled": True, "schedule": True, "schedule.days": ["mon"],
      "schedule.from": "09:00", "schedule.to": "17:00", "schedule.timezone": ""},
     {"name": "r", "action": "deny", "enabled": True,
      "schedule": {"days": ["mon"], "from": "09:00", "to": "17:00"}}, {}),
    ({"name": "r", "action": "deny", "enabled": True, "schedule": False, "schedule.from": "09:00"},
     {"name": "r", "action": "deny", "enabled": True}, {}),
])
def test_rule_form_to_document(values, item, errors):
    assert S.from_form(RULES.fields, values) == (item, errors)


def test_document_to_form_and_back_is_the_same_rule():
    rule = {"name": "r", "action": "deny", "reason": "why", "enabled": False, "domains": ["a.test", "*.b.test"],
            "ports": [443, "8000-8100"], "groups": ["staff"],
            "schedule": {"days": ["sat", "sun"], "from": "22:00", "to": "06:00", "timezone": "Europe/Berlin"}}
    values = S.to_form(RULES.fields, rule)
    assert values["domains"] == "a.test\n*.b.test" and values["schedule"] is True
    assert S.from_form(RULES.fields, values) == (rule, {})


@pytest.mark.parametrize("path, field", [
    ("access.rules[2] (r).domains[0]", "domains"),
    ("access.rules[2] (r).schedule.from", "schedule.from"),
    ("access.rules[2] (r).schedule", "schedule"),
    ("access.rules[2].name", "name"),
    ("access.rules[2] (r).name", "name"),
    ("access.rules[3] (r).domains[0]", None),
    ("access.rules[2] (r)x.domains", None),
    ("users[0] (alice).groups[0]", None),
])
def test_validation_errors_find_their_field(path, field):
    prefixes = (RULES.error_prefix(2, "r"), "access.rules[2]")
    assert S.field_for_error(PolicyError(path, "bad"), prefixes, RULES.fields) == field


def test_put_remove_and_move_items_leave_the_original_alone():
    document = {"access": {"default_action": "allow", "rules": [{"name": "a"}, {"name": "b"}]},
                "categories": {"x": {"domains": []}, "y": {"domains": []}}}
    moved = S.move_item(document, RULES, 1, -1)
    assert [r["name"] for r in moved["access"]["rules"]] == ["b", "a"]
    assert [r["name"] for r in document["access"]["rules"]] == ["a", "b"]
    categories = S.SECTIONS_BY_SLUG["categories"].lists[0]
    renamed = S.put_item(document, categories, 0, {"name": "z", "domains": ["z.test"]})
    assert list(renamed["categories"]) == ["z", "y"]
    assert list(S.remove_item(document, categories, 1)["categories"]) == ["x"]
    default = S.SECTIONS_BY_SLUG["access"].objects[0]
    changed = S.put_object(document, default, {"default_action": "deny"})
    assert changed["access"] == {"default_action": "deny", "rules": document["access"]["rules"]}


@pytest.mark.parametrize("address, listed, allowed", [
    ("10.1.2.3", ["10.1.0.0/16"], True),
    ("10.2.0.1", ["10.1.0.0/16"], False),
    ("::ffff:10.1.2.3", ["10.1.0.0/16"], True),
    ("2001:db8::5", ["2001:db8::/32"], True),
    ("2001:db8::5", ["10.0.0.0/8"], False),
    ("not-an-ip", ["0.0.0.0/0"], False),
    ("192.0.2.7", ["192.0.2.7"], True),
])
def test_allow_list_matching(address, listed, allowed):
    networks = portal_networks({"access_restriction": {"portal_allow": listed}})
    assert address_in(address, networks) is allowed


@pytest.mark.parametrize("params, field", [
    ({"master": "host"}, "master"),
    ({"master": "host:0"}, "master"),
    ({"master": "host:70000"}, "master"),
    ({"listen": "nonsense:1:2"}, "listen"),
    ({"portal": "tcp:notaport"}, "portal"),
    ({"node_name": "bad name"}, "node_name"),
    ({"colour": "blue"}, "colour"),
])
def test_startup_parameter_errors(params, field):
    with pytest.raises(StartupParamError) as raised:
        check_params(params)
    assert raised.value.field == field


def test_startup_parameters_round_trip(tmp_path):
    params = StartupParams(tmp_path)
    assert params.load() == {}
    saved = params.save({"master": " [2001:db8::1]:8888 ", "listen": "tcp:3128", "portal": "", "node_name": "s-1"})
    assert saved == {"master": "[2001:db8::1]:8888", "listen": "tcp:3128", "node_name": "s-1"}
    assert params.load() == saved
    assert oct((tmp_path / "startup.json").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("value, text", [
    ("=1+1", "'=1+1"), ("+x", "'+x"), ("-2", "'-2"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"),
    ("plain", "plain"), (None, ""), (12, "12"), (-3, "-3"), (1.5, "1.5"), (["a", "b"], "a b"),
])
def test_csv_cells(value, text):
    assert cell(value) == text


def test_csv_bytes_quote_as_needed():
    assert csv_bytes(("a", "b"), [("x,y", 'say "hi"')]) == b'a,b\r\n"x,y","say ""hi"""\r\n'


def test_diff_lines_are_classified():
    lines = classify(document_diff({"a": 1}, {"a": 2}, "old", "new"))
    kinds = [line.kind for line in lines]
    assert kinds[:3] == ["file", "file", "hunk"] and "add" in kinds and "del" in kinds


@pytest.mark.parametrize("data, message", [
    ([], "not a backup"),
    ({"format": "safesquid-backup/1", "versions": []}, "no policy version"),
    ({"format": "safesquid-backup/1", "versions": [{"version": 0, "policy": {}}]}, "positive whole number"),
    ({"format": "safesquid-backup/1", "versions": [{"version": 1, "policy": {"format": "x"}}]}, "does not validate"),
    ({"format": "safesquid-backup/1", "versions": [
        {"version": 1, "digest": "sha256:00", "policy": {"format": "safesquid-policy/1",
                                                          "access": {"default_action": "allow"}}}]}, "digest"),
])
def test_backups_that_cannot_be_restored(data, message):
    with pytest.raises(BackupError) as raised:
        check_backup(data)
    assert message in str(raised.value)
