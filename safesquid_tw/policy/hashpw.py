"""`python -m safesquid_tw.policy.hashpw`: print an argon2id hash for a proxy user's password.

The password is read with a hidden prompt (asked twice) on a terminal, or as the first line of
standard input otherwise (`printf '%s\\n' "$PW" | python -m safesquid_tw.policy.hashpw`).
Put the printed line into the user's `password_hash`.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TextIO

import argon2

# RFC 9106 / OWASP's second recommended profile: 19 MiB, 2 passes, 1 lane. About 20 to 50 ms
# per verification on a server core: slow for a guesser, affordable once per user and policy
# version for a proxy that remembers what it verified.
MEMORY_COST_KIB = 19456
TIME_COST = 2
PARALLELISM = 1


def make_hasher() -> argon2.PasswordHasher:
    return argon2.PasswordHasher(
        time_cost=TIME_COST, memory_cost=MEMORY_COST_KIB, parallelism=PARALLELISM, type=argon2.Type.ID
    )


def hash_password(password: str) -> str:
    return make_hasher().hash(password)


def read_password(stdin: TextIO, interactive: bool) -> str:
    if interactive:
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the passwords differ")
        return first
    line = stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safesquid_tw.policy.hashpw",
        description="Print an argon2id hash of a password, for a user's password_hash in the policy.",
    )
    parser.parse_args(argv)
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    try:
        password = read_password(stdin, interactive=stdin.isatty())
    except (ValueError, EOFError, KeyboardInterrupt) as e:
        print(f"hashpw: {e or 'no password given'}", file=sys.stderr)
        return 1
    if not password:
        print("hashpw: the password is empty", file=sys.stderr)
        return 1
    print(hash_password(password), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
