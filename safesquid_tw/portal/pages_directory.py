"""The "test directory settings" page and API call, beside the users and groups section.

It tests the settings the administrator is editing (their draft, else the running version), so a
mistake shows before it is applied. The password field, when filled, is only used for one bind.
"""

from __future__ import annotations

from safesquid_tw.identity.probe import test_directory
from safesquid_tw.portal.pages_policy import working_document
from safesquid_tw.portal.web import Call, Error, Page, Reply, route

MAX_NAME = 256


async def directory_test_page(call: Call) -> Reply:
    return Page("portal/directory_test.html", {"values": {}, "result": None})


async def run_directory_test(call: Call) -> Reply:
    user = (call.form.get("user") or "").strip()
    password = call.form.get("password") or None
    if not user or len(user) > MAX_NAME:
        return Page("portal/directory_test.html", {"values": {"user": user[:MAX_NAME]}, "result": None,
                                                    "error": "Enter a user name to look up."}, code=400)
    document, _draft = await working_document(call)
    if document is None:
        return Error(503, "No policy", "This node has no policy yet.")
    result = await call.services.in_thread(test_directory, document, user, password)
    return Page("portal/directory_test.html", {"values": {"user": user}, "result": result})


ROUTES = [
    route("GET", "/directory/test", directory_test_page),
    route("POST", "/directory/test", run_directory_test),
]

__all__ = ["ROUTES"]
