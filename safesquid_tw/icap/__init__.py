"""An ICAP (RFC 3507) client for content scanning services."""
