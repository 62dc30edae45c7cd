"""The one error a policy document can raise: where it is wrong, and why."""

from __future__ import annotations


class PolicyError(ValueError):
    """A policy document that does not validate.

    `path` names the section, item and field (`access.rules[3] (block-games).domains[0]`, or
    `(document)` for the whole document); `message` says what is wrong with it.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message

    def __reduce__(self) -> tuple[type[PolicyError], tuple[str, str]]:
        return (type(self), (self.path, self.message))


__all__ = ["PolicyError"]
