"""`python -m safesquid_tw.policy.check POLICY.json`: validate a policy file before using it.

Prints the canonical digest when the file is valid, and warnings (rules an earlier rule shadows)
on standard error; exit status 0 when valid (warnings or not), 1 with the validator's message.
"""

from __future__ import annotations

import argparse
import sys

from safesquid_tw.policy.codec import digest, load_policy_file
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.shadowing import shadowed_rules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safesquid_tw.policy.check",
                                     description="Validate a policy file; warn about shadowed rules.")
    parser.add_argument("policy", help="the policy JSON file")
    args = parser.parse_args(argv)
    try:
        policy = load_policy_file(args.policy)
    except (OSError, PolicyError) as e:
        print(f"{args.policy}: {e}", file=sys.stderr)
        return 1
    for warning in shadowed_rules(policy.document):
        print(f"{args.policy}: warning: {warning.message}", file=sys.stderr)
    print(f"{args.policy}: valid, digest {digest(policy.document)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
