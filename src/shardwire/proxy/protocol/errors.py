"""Errors a client can see, each with a SQLSTATE from PostgreSQL's errcodes list."""

from __future__ import annotations

from dataclasses import dataclass

# The SQLSTATEs Shardwire itself raises. Errors from a shard are forwarded with the shard's own.
FEATURE_NOT_SUPPORTED = "0A000"
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CONNECTION_EXCEPTION = "08000"
SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
TOO_MANY_CONNECTIONS = "53300"
QUERY_CANCELED = "57014"
CANNOT_CONNECT_NOW = "57P03"
ADMIN_SHUTDOWN = "57P01"
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"
INVALID_CATALOG_NAME = "3D000"
INVALID_PARAMETER_VALUE = "22023"
PROGRAM_LIMIT_EXCEEDED = "54000"
SYNTAX_ERROR = "42601"
CONFIG_FILE_ERROR = "F0000"
INTERNAL_ERROR = "XX000"
INSUFFICIENT_PRIVILEGE = "42501"
DUPLICATE_PREPARED_STATEMENT = "42P05"
UNDEFINED_PREPARED_STATEMENT = "26000"
UNDEFINED_OBJECT = "42704"


@dataclass(frozen=True, slots=True)
class PgError(Exception):
    """An error to send to a client as an ErrorResponse.

    `fatal` errors end the connection after they are sent (severity FATAL).
    """

    sqlstate: str
    message: str
    hint: str | None = None
    detail: str | None = None
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.sqlstate}: {self.message}"

    @property
    def severity(self) -> str:
        return "FATAL" if self.fatal else "ERROR"
