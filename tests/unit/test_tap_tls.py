"""`--upstream-ca-file`: checked when the node starts, then carried to the node's config."""

from __future__ import annotations

import pytest
import trustme
from twisted.python import usage

from safesquid_tw import tap


def parse(*argv: str):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options.config


def test_a_pem_bundle_reaches_the_config(tmp_path):
    path = tmp_path / "origins.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    assert parse("--upstream-ca-file", str(path)).upstream_ca_file == str(path)
    assert parse().upstream_ca_file is None


def test_missing_or_non_pem_files_are_usage_errors(tmp_path):
    with pytest.raises(usage.UsageError, match="--upstream-ca-file"):
        parse("--upstream-ca-file", str(tmp_path / "absent.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(usage.UsageError, match="no PEM certificate"):
        parse("--upstream-ca-file", str(junk))
