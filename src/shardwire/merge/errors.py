"""Errors a merge raises. Each carries a SQLSTATE from PostgreSQL's errcodes list."""

from __future__ import annotations


class MergeError(Exception):
    """The statement failed while its shards' rows were merged (or could not be merged).

    The executor sends it to the client as an ErrorResponse with `sqlstate`, `message` and
    `hint`, as PostgreSQL would for the same failure (22012 for a division by zero in HAVING,
    22003 for an overflow in a re-aggregated sum...)."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sqlstate!r}, {self.message!r}, {self.hint!r})"


class MergeRefused(MergeError):
    """What cannot be merged exactly: usually 0A000 (feature_not_supported)."""

    def __init__(self, message: str, hint: str | None = None, sqlstate: str = "0A000") -> None:
        super().__init__(sqlstate, message, hint)


def overflow(type_name: str) -> MergeError:
    """PostgreSQL's error for an integer result out of its type's range."""
    return MergeError("22003", f"{type_name} out of range")


def division_by_zero() -> MergeError:
    return MergeError("22012", "division by zero")
