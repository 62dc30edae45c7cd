"""Directory identity without servers: validation, remembered verdicts, group mapping, tokens,
write-only secrets in the API, the portal's forms and diffs."""

from __future__ import annotations

import base64
import json

import pytest
from portalkit import POLICY, Portal

from safesquid_tw.identity.authenticator import DirectoryAuthenticator, DirectoryState
from safesquid_tw.identity.errors import DirectoryUnavailable
from safesquid_tw.identity.ldapdir import DirectorySettings, DirectoryUser
from safesquid_tw.identity.negotiate import negotiate_token
from safesquid_tw.identity.verdicts import ExpiringVerdicts
from safesquid_tw.policy import secrets
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.model import MISS
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.portal import sections as S

DIRECTORY = {
    "urls": ["ldap://127.0.0.1:389"], "bind_dn": "cn=proxy,dc=example,dc=com", "bind_password": "s3cret-bind",
    "user_base": "ou=people,dc=example,dc=com", "user_filter": "(uid={user})",
}


def document(**directory) -> dict:
    doc = json.loads(json.dumps(POLICY))
    doc["authentication"] = {"enabled": True, "directory": {**DIRECTORY, **directory}}
    doc["groups"] = [{"name": "staff", "directory_groups": ["cn=staff,ou=groups,dc=example,dc=com"]},
                     {"name": "eng", "directory_groups": ["Engineering"]}]
    return doc


# -- validation ---------------------------------------------------------------------------------

def test_directory_section_gets_its_defaults():
    checked = validate_document(document())
    section = checked["authentication"]["directory"]
    assert section["group_membership"] == "memberOf"
    assert section["group_base"] == DIRECTORY["user_base"]
    assert section["timeout_seconds"] == 5 and section["cache_seconds"] == 300
    assert section["start_tls"] is False and section["ca_pem"] is None
    assert checked["groups"][0]["directory_groups"] == ["cn=staff,ou=groups,dc=example,dc=com"]


def test_documents_without_a_directory_keep_their_form():
    checked = validate_document(POLICY)
    assert "directory" not in checked["authentication"] and "negotiate" not in checked["authentication"]
    assert "directory_groups" not in checked["groups"][0]


@pytest.mark.parametrize("change, path", [
    ({"urls": []}, "authentication.directory.urls"),
    ({"urls": ["http://dir:389"]}, "authentication.directory.urls[0]"),
    ({"urls": ["ldap://u:p@dir:389"]}, "authentication.directory.urls[0]"),
    ({"urls": ["ldaps://dir:636"], "start_tls": True}, "authentication.directory.urls[0]"),
    ({"bind_password": ""}, "authentication.directory.bind_password"),
    ({"user_filter": "(uid=alice)"}, "authentication.directory.user_filter"),
    ({"user_filter": "(uid={user}"}, "authentication.directory.user_filter"),
    ({"principal_filter": "(upn=x)"}, "authentication.directory.principal_filter"),
    ({"group_membership": "groups"}, "authentication.directory.group_membership"),
    ({"timeout_seconds": 0}, "authentication.directory.timeout_seconds"),
    ({"ca_pem": "not a certificate"}, "authentication.directory.ca_pem"),
    ({"bind_dn": "proxy"}, "authentication.directory.bind_dn"),
    ({"type": "nis"}, "authentication.directory.type"),
])
def test_bad_directory_settings_are_refused_at_their_field(change, path):
    with pytest.raises(PolicyError) as caught:
        validate_document(document(**change))
    assert caught.value.path == path


def test_the_refusal_never_quotes_the_bind_password():
    with pytest.raises(PolicyError) as caught:
        validate_document(document(bind_password=["s3cret-bind"]))
    assert "s3cret-bind" not in str(caught.value)


# -- verdicts and groups -------------------------------------------------------------------------

def test_verdicts_expire_good_and_bad_on_their_own_clocks():
    now = [0.0]
    verdicts = ExpiringVerdicts(lambda: now[0], good_seconds=300, bad_seconds=5)
    verdicts.remember(b"good", "alice")
    verdicts.remember(b"bad", None)
    assert verdicts.get(b"good") == "alice" and verdicts.get(b"bad") is None
    now[0] = 6
    assert verdicts.get(b"bad") is MISS and verdicts.get(b"good") == "alice"
    now[0] = 301
    assert verdicts.get(b"good") is MISS


def test_verdicts_are_bounded():
    verdicts = ExpiringVerdicts(lambda: 0.0, good_seconds=10, limit=3)
    for i in range(5):
        verdicts.remember(bytes([i]), i)
    assert len(verdicts) == 3 and verdicts.get(bytes([0])) is MISS and verdicts.get(bytes([4])) == 4


class FakeDirectory:
    """Stands in for the LDAP connection in tests of what is remembered and when it is asked."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    def authenticate(self, user, password):
        self.calls += 1
        if self.down:
            raise DirectoryUnavailable("connection refused")
        if password != "right":
            return None
        return DirectoryUser(user, f"uid={user},ou=people,dc=example,dc=com",
                             frozenset({"cn=staff,ou=groups,dc=example,dc=com", "cn=engineering,ou=groups,dc=example,dc=com"}))


def authenticator(clock):
    settings = DirectorySettings.from_policy(validate_document(document())["authentication"]["directory"])
    fake = FakeDirectory()
    state = DirectoryState(settings, clock=clock, wall=clock, directory=fake)
    return DirectoryAuthenticator(state, validate_document(document())["groups"]), fake


def test_directory_groups_map_to_policy_groups_by_dn_and_by_name():
    auth, _fake = authenticator(lambda: 0.0)
    identity = auth.verify("alice", "right")
    assert identity.user == "alice" and identity.groups == {"staff", "eng"}


def test_a_directory_outage_keeps_fresh_verdicts_and_refuses_new_users():
    now = [0.0]
    auth, fake = authenticator(lambda: now[0])
    assert auth.verify("alice", "right") is not None
    fake.down = True
    assert auth.cached("alice", "right").user == "alice"  # no directory call needed
    with pytest.raises(DirectoryUnavailable):
        auth.verify("carol", "right")
    assert auth.state.stats()["reachable"] is False
    now[0] = 301  # alice's verdict has expired: she needs the directory again
    assert auth.cached("alice", "right") is MISS
    fake.down = False
    assert auth.verify("carol", "right").user == "carol"
    assert auth.state.stats()["reachable"] is True


def test_wrong_passwords_are_remembered_briefly():
    now = [0.0]
    auth, fake = authenticator(lambda: now[0])
    assert auth.verify("alice", "wrong") is None
    assert auth.verify("alice", "wrong") is None
    assert fake.calls == 1
    now[0] = 6
    auth.verify("alice", "wrong")
    assert fake.calls == 2


def test_a_new_version_with_the_same_directory_keeps_the_verdicts():
    auth, fake = authenticator(lambda: 0.0)
    auth.verify("alice", "right")
    newer = DirectoryAuthenticator.from_policy(validate_document(document()))
    newer.adopt(auth)
    assert newer.cached("alice", "right").user == "alice"
    other = DirectoryAuthenticator.from_policy(validate_document(document(cache_seconds=60)))
    other.adopt(auth)
    assert other.cached("alice", "right") is MISS


# -- Negotiate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (b"Negotiate " + base64.b64encode(b"token"), b"token"),
    (b"negotiate  " + base64.b64encode(b"token"), b"token"),
    (b"Basic " + base64.b64encode(b"a:b"), None),
    (b"Negotiate !!!", None),
    (b"Negotiate", None),
    (None, None),
])
def test_negotiate_token(value, expected):
    assert negotiate_token(value) == expected


# -- write-only secrets -----------------------------------------------------------------------------

def test_redact_and_restore():
    checked = validate_document(document())
    shown = secrets.redact(checked)
    assert shown["authentication"]["directory"]["bind_password"] == {"$secret": "set"}
    assert checked["authentication"]["directory"]["bind_password"] == "s3cret-bind"  # a copy was changed
    assert secrets.restore(shown, checked) == checked
    changed = validate_document(document(bind_password="another"))
    assert secrets.redact(changed, checked)["authentication"]["directory"]["bind_password"] == {"$secret": "changed"}


@pytest.fixture
def directory_portal(tmp_path):
    return Portal(tmp_path, policy=validate_document(document()))


def api_call(portal, method, path, body=None):
    headers = {"Authorization": f"Bearer {portal.api_token()}"}
    kwargs = {}
    if body is not None:
        kwargs["data"] = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return portal.client().request(method, path, headers=headers, **kwargs)


def test_the_api_never_shows_the_bind_password_and_keeps_it_on_apply(directory_portal):
    portal = directory_portal
    shown = api_call(portal, "GET", "/api/v1/policy")
    assert "s3cret-bind" not in shown.text
    doc = shown.json()["document"]
    assert doc["authentication"]["directory"]["bind_password"] == {"$secret": "set"}
    doc["authentication"]["realm"] = "changed-realm"
    applied = api_call(portal, "POST", "/api/v1/policy", {"document": doc})
    assert applied.code == 201, applied.text
    running = portal.store.current.document["authentication"]
    assert running["realm"] == "changed-realm" and running["directory"]["bind_password"] == "s3cret-bind"
    doc["authentication"]["directory"]["bind_password"] = "rotated"
    assert api_call(portal, "POST", "/api/v1/policy", {"document": doc}).code == 201
    assert "s3cret-bind" not in api_call(portal, "GET", "/api/v1/policy/versions/1").text
    diff = api_call(portal, "GET", "/api/v1/policy/diff?from=2&to=3").json()["diff"]
    assert '"$secret": "changed"' in diff and "rotated" not in diff and "s3cret-bind" not in diff
    audit = json.dumps(portal.audit())
    assert '"apply"' in audit and "rotated" not in audit and "s3cret-bind" not in audit


def test_the_directory_form_keeps_an_empty_password_and_drops_an_empty_directory():
    checked = validate_document(document())
    form = next(o for o in S.SECTIONS_BY_SLUG["users"].objects if o.name == "directory")
    values = S.to_form(form.fields, checked["authentication"]["directory"])
    assert values["bind_password"] == ""
    fragment, errors = S.from_form(form.fields, {**values, "user_filter": "(cn={user})"})
    assert not errors
    changed = S.put_object(checked, form, fragment)
    assert changed["authentication"]["directory"]["bind_password"] == "s3cret-bind"
    assert changed["authentication"]["directory"]["user_filter"] == "(cn={user})"
    validate_document(changed)
    fragment, _ = S.from_form(form.fields, {**values, "urls": ""})
    assert "directory" not in S.put_object(checked, form, fragment)["authentication"]


def test_the_users_page_never_shows_the_bind_password(directory_portal):
    admin = directory_portal.admin()
    page = admin.get("/policy/users")
    assert page.code == 200
    assert "s3cret-bind" not in page.text and "Test directory settings" in page.text
