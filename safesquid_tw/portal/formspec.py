"""The policy sections as the portal shows them: which forms each page has, which fields each form
has, and what kind of value each field holds. Plain data, read by `sections.py` and the templates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from safesquid_tw.policy.antivirus import DEFAULTS as ANTIVIRUS_DEFAULTS
from safesquid_tw.policy.antivirus import FAIL_MODES, OVERSIZE_ACTIONS
from safesquid_tw.policy.fields import DAYS
from safesquid_tw.policy.forwarding import MODES as FORWARDING_MODES
from safesquid_tw.policy.tlsinspection import DEFAULTS as TLS_INSPECTION_DEFAULTS
from safesquid_tw.policy.tlsrules import TLS_MODES
from safesquid_tw.policy.validate import ACCESS_RESTRICTION_DEFAULTS, DETECTOR_TYPES, DLP_ACTIONS
from safesquid_tw.policy.validate import FORWARDING_DEFAULTS

FormValues = dict[str, Any]  # field key -> str, bool or list[str]


@attrs.frozen
class Field:
    key: str  # key in the item; "schedule.from" for a key of the nested schedule
    label: str
    # text, textarea, lines, ports, int, int_or_null, number, bool, select, multi, headers, password,
    # secret (write-only text: never shown, left empty to keep the stored value)
    kind: str
    help: str = ""
    choices: tuple[str, ...] = ()
    choices_from: str | None = None  # "users", "groups", "categories", "applications" of the document
    required: bool = False


@attrs.frozen
class ObjectForm:
    """A form over one object of the document (a section, or part of one)."""

    name: str
    title: str
    path: tuple[str, ...]
    fields: tuple[Field, ...]
    defaults: Mapping[str, Any] = attrs.field(factory=dict)
    # Optional objects (the directory) are removed from the document when this field is empty.
    present_when: str | None = None


@attrs.frozen
class ListForm:
    """A form over the items of a list (or of a name -> item mapping) in the document."""

    name: str
    title: str
    noun: str  # "rule", "user", ...
    path: tuple[str, ...]
    fields: tuple[Field, ...]
    mapping: bool = False  # categories: {name: {...}} rather than [{"name": ...}]
    summary: Callable[[dict[str, Any]], str] = lambda item: ""

    def error_prefix(self, index: int, name: str) -> str:
        if self.mapping:
            return ".".join(self.path) + f".{name}"
        return ".".join(self.path) + f"[{index}] ({name})"


@attrs.frozen
class Section:
    slug: str
    title: str
    intro: str
    objects: tuple[ObjectForm, ...] = ()
    lists: tuple[ListForm, ...] = ()


def _join(values: Any, limit: int = 4) -> str:
    values = list(values or ())
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (+{len(values) - limit})" if len(values) > limit else "")


def rule_summary(rule: dict[str, Any]) -> str:
    parts = []
    for key in ("clients", "users", "groups", "domains", "url_patterns", "methods", "ports", "categories",
                "applications", "tls"):
        if key in rule:
            parts.append(f"{key.replace('_', ' ')}: {_join(rule[key])}")
    if "schedule" in rule:
        schedule = rule["schedule"]
        parts.append(f"schedule: {_join(schedule['days'], 7)} {schedule['from']}-{schedule['to']}")
    return "; ".join(parts) or "every request"


NETWORKS_HELP = "One address or CIDR network per line, e.g. 10.0.0.0/8"
RULE_FIELDS = (
    Field("name", "Name", "text", required=True),
    Field("action", "Action", "select", choices=("deny", "allow")),
    Field("reason", "Reason shown on the block page", "text"),
    Field("enabled", "Enabled", "bool"),
    Field("clients", "Client networks", "lines", NETWORKS_HELP),
    Field("users", "Users", "multi", choices_from="users"),
    Field("groups", "Groups", "multi", choices_from="groups"),
    Field("domains", "Domains", "lines", "One per line: example.com (that host) or *.example.com (and subdomains)"),
    Field("url_patterns", "URL patterns", "lines", "Shell-style patterns over the whole URL, e.g. */ads/*"),
    Field("methods", "Methods", "lines", "e.g. GET, POST, CONNECT; one per line"),
    Field("ports", "Destination ports", "ports", "One per line: 80 or a range 8000-8100"),
    Field("categories", "Categories", "multi", choices_from="categories"),
    Field("applications", "Applications", "multi", choices_from="applications"),
    Field("schedule", "Only at these times", "bool"),
    Field("schedule.days", "Days", "multi", choices=DAYS),
    Field("schedule.from", "From", "text", "HH:MM"),
    Field("schedule.to", "To", "text", "HH:MM (24:00 is the end of the day)"),
    Field("schedule.timezone", "Time zone", "text", "IANA name, e.g. Europe/Berlin; empty: the node's"),
    Field("tls", "How the request came", "multi",
          "inspected: decrypted from an inspected HTTPS tunnel (and the CONNECT of one); bypassed: the "
          "CONNECT of a tunnel carried uninspected; plain: plain HTTP. None ticked: any", choices=TLS_MODES),
)

SECTIONS: tuple[Section, ...] = (
    Section(
        "access", "Access rules",
        "Ordered rules: the first that matches a request decides; when none does, the default action applies.",
        objects=(ObjectForm("default", "Default action", ("access",), (
            Field("default_action", "When no rule matches", "select", choices=("allow", "deny")),)),),
        lists=(ListForm("rules", "Rules", "rule", ("access", "rules"), RULE_FIELDS, summary=rule_summary),),
    ),
    Section(
        "users", "Users, groups and authentication",
        "Proxy users log in with HTTP Basic authentication; their passwords are stored as argon2id hashes only.",
        objects=(ObjectForm("authentication", "Authentication", ("authentication",), (
            Field("enabled", "Ask clients to log in", "bool"),
            Field("realm", "Realm", "text"),
            Field("exempt_networks", "Networks exempt from logging in", "lines", NETWORKS_HELP),
            Field("negotiate", "Offer Kerberos (Negotiate) on nodes started with --keytab", "bool"),
        )), ObjectForm("directory", "Directory (LDAP / Active Directory)", ("authentication", "directory"), (
            Field("urls", "Servers", "lines", "ldap://host:389 or ldaps://host:636, one per line, tried in turn; "
                  "leave empty for no directory"),
            Field("start_tls", "StartTLS on ldap:// servers", "bool"),
            Field("ca_pem", "CA certificates (PEM) for TLS", "textarea", "Empty: the system's trust store"),
            Field("bind_dn", "Search account DN", "text", "e.g. cn=proxy,ou=services,dc=example,dc=com"),
            Field("bind_password", "Search account password", "secret", "Leave empty to keep the current password"),
            Field("user_base", "User search base", "text", "e.g. ou=people,dc=example,dc=com"),
            Field("user_filter", "User filter", "text", "(uid={user}) or (sAMAccountName={user})"),
            Field("principal_filter", "Kerberos principal filter", "text",
                  "Optional, e.g. (userPrincipalName={principal})"),
            Field("group_base", "Group search base", "text", "e.g. ou=groups,dc=example,dc=com"),
            Field("group_membership", "Group membership", "select", choices=("memberOf", "member")),
            Field("timeout_seconds", "Timeout (seconds)", "number"),
            Field("cache_seconds", "Remember verdicts for (seconds)", "number"),
        ), present_when="urls"),),
        lists=(
            ListForm("groups", "Groups", "group", ("groups",), (
                Field("name", "Name", "text", required=True), Field("description", "Description", "text"),
                Field("directory_groups", "Directory groups", "lines",
                      "Group DNs or names from the directory whose members belong to this group"),
            ), summary=lambda g: g.get("description", "")),
            ListForm("users", "Users", "user", ("users",), (
                Field("name", "Name", "text", required=True),
                Field("password", "Password", "password", "Leave empty to keep the current password"),
                Field("groups", "Groups", "multi", choices_from="groups"),
            ), summary=lambda u: "groups: " + (_join(u.get("groups")) or "none")),
        ),
    ),
    Section(
        "categories", "Web categories",
        "Named lists of domains; a host belongs to a category when it or a parent domain is listed.",
        lists=(ListForm("categories", "Categories", "category", ("categories",), (
            Field("name", "Name", "text", required=True),
            Field("description", "Description", "text"),
            Field("domains", "Domains", "lines", "One domain per line"),
        ), mapping=True, summary=lambda c: f"{len(c.get('domains', []))} domains: {_join(c.get('domains'), 3)}"),),
    ),
    Section(
        "applications", "Application signatures",
        "Signatures that name the application of a request; the first that matches, in this order, wins.",
        lists=(ListForm("applications", "Applications", "application", ("applications",), (
            Field("name", "Name", "text", required=True),
            Field("description", "Description", "text"),
            Field("hosts", "Hosts", "lines", "One per line: example.com or *.example.com", required=True),
            Field("paths", "Paths", "lines", "Shell-style patterns over path and query, one per line"),
            Field("headers", "Headers", "headers", "One per line: header-name: pattern"),
        ), summary=lambda a: "hosts: " + _join(a.get("hosts"))),),
    ),
    Section(
        "content", "Content security",
        "File types and sizes the gateway refuses, enforced while bodies stream.",
        objects=(ObjectForm("content_security", "Content security", ("content_security",), (
            Field("blocked_mime_types", "Blocked MIME types", "lines", "type/subtype or type/*, one per line"),
            Field("blocked_extensions", "Blocked file extensions", "lines", "Without the dot, one per line"),
            Field("max_upload_bytes", "Largest upload (bytes)", "int_or_null", "Empty: no limit"),
            Field("max_download_bytes", "Largest download (bytes)", "int_or_null", "Empty: no limit"),
        )),),
    ),
    Section(
        "dlp", "Data loss prevention",
        "Detectors over query strings and request bodies; each blocks the request or only logs it.",
        objects=(ObjectForm("scan", "Scanning", ("dlp",), (
            Field("scan_limit_bytes", "Bytes of each body scanned", "int"),)),),
        lists=(ListForm("detectors", "Detectors", "detector", ("dlp", "detectors"), (
            Field("name", "Name", "text", required=True),
            Field("type", "Type", "select", choices=DETECTOR_TYPES),
            Field("patterns", "Patterns", "lines", "Keywords or regular expressions, one per line "
                  "(none for card_number)"),
            Field("action", "Action", "select", choices=DLP_ACTIONS),
        ), summary=lambda d: f"{d['type']}, {d['action']}" + (f": {_join(d.get('patterns'), 3)}"
                                                              if d.get("patterns") else "")),),
    ),
    Section(
        "restriction", "Access restriction",
        "Which client networks may use this portal and its API, and which slaves may join the cluster.",
        objects=(ObjectForm("access_restriction", "Allow lists", ("access_restriction",), (
            Field("portal_allow", "Networks allowed to use the portal and API", "lines",
                  NETWORKS_HELP + ". Empty: every network."),
            Field("slave_allow_enabled", "Admit only listed slaves", "bool"),
            Field("slave_allow", "Slave networks", "lines", NETWORKS_HELP),
        ), defaults=ACCESS_RESTRICTION_DEFAULTS),),
    ),
    Section(
        "connect", "CONNECT ports",
        "Destination ports that CONNECT tunnels (HTTPS) may reach.",
        objects=(ObjectForm("connect", "Ports", ("connect",), (
            Field("allowed_ports", "Allowed ports", "ports", "One port per line"),)),),
    ),
    Section(
        "forwarding", "Forwarding",
        "What the gateway tells origins about the client (X-Forwarded-For), and which downstream "
        "proxies are believed about theirs.",
        objects=(ObjectForm("forwarding", "X-Forwarded-For", ("forwarding",), (
            Field("x_forwarded_for", "X-Forwarded-For sent upstream", "select",
                  "append: add the client's address to the list; replace: only the client's address; "
                  "delete: no X-Forwarded-For and no Forwarded; transparent: as the client sent it",
                  choices=FORWARDING_MODES),
            Field("trusted_downstream", "Trusted downstream proxies", "lines",
                  NETWORKS_HELP + ". A connection from one of these takes the right-most X-Forwarded-For "
                  "address outside them as the client. Empty: no client's X-Forwarded-For is believed."),
        ), defaults=FORWARDING_DEFAULTS),),
    ),
    Section(
        "tls", "TLS inspection",
        "Decrypt HTTPS tunnels so that every section applies to them; bypassed tunnels are spliced "
        "unchanged. Clients must trust the inspection CA (TLS inspection page).",
        objects=(ObjectForm("tls_inspection", "Inspection", ("tls_inspection",), (
            Field("enabled", "Inspect CONNECT tunnels", "bool"),
            Field("bypass_domains", "Bypassed domains", "lines", "example.com or *.example.com, one per line"),
            Field("bypass_categories", "Bypassed categories", "multi", choices_from="categories"),
            Field("bypass_clients", "Bypassed client networks", "lines", NETWORKS_HELP),
            Field("allow_invalid_upstream_domains", "Origins whose certificate errors are tolerated", "lines",
                  "example.com or *.example.com, one per line; each use is logged"),
            Field("auto_bypass_pinned", "Auto-bypass after this many rejections", "int",
                  "A host whose clients reject the certificate this often within 10 minutes is spliced for "
                  "an hour (per node); 0: never"),
        ), defaults=TLS_INSPECTION_DEFAULTS),),
    ),
    Section(
        "antivirus", "Anti-virus",
        "Downloads and uploads scanned over ICAP (c-icap with ClamAV, or any RFC 3507 service) before "
        "they are released.",
        objects=(ObjectForm("antivirus", "Scanning", ("antivirus",), (
            Field("enabled", "Scan for viruses", "bool"),
            Field("icap_services", "ICAP services", "lines",
                  "icap://host:port/service, one per line, used in turn (the next when one fails); "
                  "icap://127.0.0.1:1344/avscan means each node's own scanner"),
            Field("scan_downloads", "Scan downloads", "bool"),
            Field("scan_uploads", "Scan uploads", "bool"),
            Field("max_scan_bytes", "Largest object scanned (bytes)", "int"),
            Field("oversize_action", "Larger objects", "select", choices=OVERSIZE_ACTIONS),
            Field("skip_mime_types", "MIME types not scanned", "lines", "type/subtype or type/*, one per line"),
            Field("timeout_seconds", "Scanner timeout (seconds)", "int"),
            Field("fail_mode", "When no scanner answers", "select", "closed: refuse (503); open: let it "
                  "through unscanned", choices=FAIL_MODES),
            Field("self_test_seconds", "EICAR self-test every (seconds)", "int"),
            Field("verdict_cache_seconds", "Remember clean verdicts for (seconds)", "int", "0: never"),
        ), defaults=ANTIVIRUS_DEFAULTS),),
    ),
)

SECTIONS_BY_SLUG = {s.slug: s for s in SECTIONS}


__all__ = ["SECTIONS", "SECTIONS_BY_SLUG", "Field", "FormValues", "ListForm", "ObjectForm", "Section", "rule_summary"]
