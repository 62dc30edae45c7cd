"""The policy: one JSON document per version, validated, compiled into look-up tables, decided on.

`model` (request facts, decisions), `codec` (the one JSON form, validation, loading),
`compiled` (a version's look-up tables and `decide`), `store` (the node's current version and
its cache). See docs/policy-format.md for the document itself.
"""
