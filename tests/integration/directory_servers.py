"""A real OpenLDAP slapd and a real MIT Kerberos KDC for the tests, from temporary directories.

Both listen on loopback ports chosen here, run in their own process groups (stopped with them),
and touch nothing outside their directory: slapd reads the distribution's schema files, the KDC
and every Kerberos client are pointed at a krb5.conf of their own through KRB5_CONFIG.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from processes import free_port, stop_process

BASE_DN = "dc=example,dc=com"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "directory-admin-password"
PEOPLE = f"ou=people,{BASE_DN}"
GROUPS = f"ou=groups,{BASE_DN}"
REALM = "EXAMPLE.TEST"
PROXY_NAME = "proxy.example.test"
SERVICE_PRINCIPAL = f"HTTP/{PROXY_NAME}"

# user -> (password, direct groups); "engineering" contains the group "staff" (nesting).
USERS = {
    "alice": ("alice-password", ["staff"]),
    "bob": ("bob-password", ["contractors"]),
    "carol": ("carol-password", []),
}
GROUP_MEMBERS = {
    "staff": [f"uid=alice,{PEOPLE}"],
    "contractors": [f"uid=bob,{PEOPLE}"],
    "engineering": [f"cn=staff,{GROUPS}"],
}


def _need(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None and not Path(program).exists():
            pytest.skip(f"{program} is not installed (scripts/test installs slapd and krb5-kdc)")


def _wait_port(host: str, port: int, process: subprocess.Popen, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.args[0]} did not listen on {host}:{port} in {timeout}s: {log.read_text()[-2000:]}")


class Slapd:
    """OpenLDAP with users, groups and a nested group; memberOf expanded by the dynlist overlay."""

    def __init__(self, root: Path) -> None:
        _need("/usr/sbin/slapd", "/usr/sbin/slapadd")
        self.root = root
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        (root / "db").mkdir(parents=True, exist_ok=True)
        self.conf = root / "slapd.conf"
        self.conf.write_text(
            "\n".join(f"include /etc/ldap/schema/{name}.schema"
                      for name in ("core", "cosine", "inetorgperson", "nis", "dyngroup"))
            + f"""
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload dynlist
pidfile {root}/slapd.pid
database mdb
maxsize 10485760
suffix "{BASE_DN}"
rootdn "{ADMIN_DN}"
rootpw {ADMIN_PASSWORD}
directory {root}/db
overlay dynlist
dynlist-attrset groupOfURLs memberURL member+memberOf@groupOfNames*
"""
        )
        (root / "data.ldif").write_text(_ldif())
        subprocess.run(["/usr/sbin/slapadd", "-f", str(self.conf), "-l", str(root / "data.ldif")],
                       check=True, capture_output=True, timeout=30)

    def start(self) -> "Slapd":
        log = self.root / "slapd.log"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                ["/usr/sbin/slapd", "-f", str(self.conf), "-h", f"{self.url}/", "-d", "0"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _wait_port("127.0.0.1", self.port, self.process, log)
        return self

    def stop(self) -> None:
        stop_process(self.process, group=True)
        self.process = None

    def settings(self, **overrides) -> dict:
        """The policy's `authentication.directory` for this server."""
        section = {
            "type": "ldap",
            "urls": [self.url],
            "bind_dn": ADMIN_DN,
            "bind_password": ADMIN_PASSWORD,
            "user_base": PEOPLE,
            "user_filter": "(uid={user})",
            "group_base": GROUPS,
            "group_membership": "memberOf",
            "timeout_seconds": 2,
            "cache_seconds": 300,
        }
        section.update(overrides)
        return section


def _ldif() -> str:
    entries = [
        f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n",
    ]
    for user, (password, _groups) in USERS.items():
        entries.append(f"dn: uid={user},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {user}\ncn: {user}\n"
                       f"sn: {user}\nuserPassword: {password}\n")
    for group, members in GROUP_MEMBERS.items():
        lines = "".join(f"member: {m}\n" for m in members)
        entries.append(f"dn: cn={group},{GROUPS}\nobjectClass: groupOfNames\ncn: {group}\n{lines}")
    return "\n".join(entries)


class Kdc:
    """An MIT Kerberos KDC with a throwaway realm, user principals and the proxy's service key."""

    def __init__(self, root: Path) -> None:
        _need("/usr/sbin/krb5kdc", "/usr/sbin/kdb5_util", "/usr/sbin/kadmin.local", "kinit")
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.keytab = root / "http.keytab"
        self.krb5_conf = root / "krb5.conf"
        self.rcache = root / "rcache"
        self.rcache.mkdir(parents=True, exist_ok=True)
        self.krb5_conf.write_text(f"""[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    ignore_acceptor_hostname = false
[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{self.port}
    }}
[domain_realm]
    .example.test = {REALM}
    example.test = {REALM}
""")
        (root / "kdc.conf").write_text(f"""[kdcdefaults]
    kdc_ports = {self.port}
    kdc_tcp_ports = {self.port}
[realms]
    {REALM} = {{
        database_name = {root}/principal
        key_stash_file = {root}/stash
        acl_file = {root}/kadm5.acl
        kdc_listen = 127.0.0.1:{self.port}
        kdc_tcp_listen = 127.0.0.1:{self.port}
    }}
""")
        (root / "kadm5.acl").write_text("")
        self.env = {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(root / "kdc.conf"),
            "KRB5RCACHEDIR": str(self.rcache),
            "KRB5_TRACE": "/dev/null",
        }
        self._admin(["/usr/sbin/kdb5_util", "create", "-s", "-r", REALM, "-P", "kdc-master-password"])
        for user, (password, _groups) in USERS.items():
            self._admin(["/usr/sbin/kadmin.local", "-r", REALM, "-q", f"addprinc -pw {password} {user}"])
        self._admin(["/usr/sbin/kadmin.local", "-r", REALM, "-q", f"addprinc -randkey {SERVICE_PRINCIPAL}"])
        self._admin(["/usr/sbin/kadmin.local", "-r", REALM, "-q",
                     f"ktadd -k {self.keytab} {SERVICE_PRINCIPAL}"])

    def _admin(self, argv: list[str]) -> None:
        result = subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout.decode()} {result.stderr.decode()}")

    def start(self) -> "Kdc":
        log = self.root / "krb5kdc.log"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                ["/usr/sbin/krb5kdc", "-n", "-r", REALM, "-P", str(self.root / "kdc.pid")],
                env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _wait_port("127.0.0.1", self.port, self.process, log)
        return self

    def stop(self) -> None:
        stop_process(self.process, group=True)
        self.process = None

    def kinit(self, user: str, ccache: Path) -> dict[str, str]:
        """Get `user` a ticket-granting ticket in `ccache`; returns the client's environment."""
        env = {**os.environ, **self.env, "KRB5CCNAME": f"FILE:{ccache}"}
        result = subprocess.run(["kinit", user], input=(USERS[user][0] + "\n").encode(), env=env,
                                capture_output=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"kinit {user} failed: {result.stderr.decode()}")
        return env


__all__ = ["Kdc", "Slapd", "USERS", "GROUPS", "PEOPLE", "REALM", "SERVICE_PRINCIPAL", "PROXY_NAME", "free_port"]
