"""The pooling relay between one client and whichever server connection serves it.

Pure: bytes in, bytes out. Two pieces:

`ServerLink` belongs to one server connection for its whole life. It remembers what that
connection has prepared and which session settings were applied to it, and filters the
connection's replies: replies to messages the proxy injected (a Parse of a client's statement
that this server has not seen yet, SETs that bring the server's settings to the client's) are
dropped, everything else streams through untouched, and ReadyForQuery tells when the server is
free again.

`ClientStatements` belongs to one client: its named prepared statements. Before a batch of the
client's messages goes to a server, `rewrite` maps the client's statement names onto names
derived from the statement text (`sw_<digest>`), preparing them on that server first where
needed. So a client may use a statement it prepared on one server connection on any other, as
with PgBouncer's `max_prepared_statements`.

Replies are matched to requests by order. Each Sync or Query opens a unit that ends with a
ReadyForQuery; every Parse and Close inside a unit is remembered in order, so each ParseComplete
and CloseComplete can be matched to its request. After an error the server skips to the next
Sync: requests of the unit that got no reply are known not to have run.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from ...router.classify import RawSql
from . import messages as m

_LEN = struct.Struct("!I").unpack_from
_HDR = struct.Struct("!cI")

_Z, _PARSE_DONE, _CLOSE_DONE, _PARAM, _ERROR, _COMPLETE = (
    ord("Z"), ord("1"), ord("3"), ord("S"), ord("E"), ord("C"))
# Client messages answered by a ReadyForQuery: Sync, Query, FunctionCall.
_ENDS_UNIT = frozenset(b"SQF")
# Extended-protocol messages whose batch is open until a Sync. (Flush and the COPY messages
# neither open nor close one.)
_OPENS_BATCH = frozenset(b"PBDEC")
_REWRITTEN = frozenset(b"PBDC")  # messages that may name a prepared statement
_INSPECT = frozenset((_Z, _PARSE_DONE, _CLOSE_DONE, _PARAM, _ERROR, _COMPLETE))

# The name used to acknowledge a client's Parse of a statement the server already has: the
# proxy sends Parse of an empty query under this name and closes it at once.
_ACK_NAME = b"sw_ack"
_CLOSED_NAME = b"sw_closed"
# A statement name no server has: binding it fails, which carries a refusal in order.
_REFUSED_NAME = b"sw_refused"  # Close of a name no server has: the server answers CloseComplete
_BEGIN_IN_BATCH = (m.message(b"P", b"\x00BEGIN\x00\x00\x00")
                   + m.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
                   + m.message(b"E", b"\x00\x00\x00\x00\x00"))


# Reported parameters a client can change; the others describe the server or the login.
SETTABLE_REPORTED = frozenset({
    "application_name", "client_encoding", "datestyle", "default_transaction_read_only",
    "intervalstyle", "standard_conforming_strings", "timezone",
})


class BackendProtocolError(Exception):
    """The server sent something that is not the wire protocol."""


@dataclass(slots=True)
class _Request:
    """A Parse or Close whose reply is still due."""

    kind: int  # _PARSE_DONE or _CLOSE_DONE
    name: bytes  # the server-side statement name, or b"" when nothing is tracked
    forward: bool  # whether the client is waiting for this reply
    seq: int  # how many Parse and Close requests were sent before this one
    # For a client's Parse or Close of a named statement: undone if the server skips it.
    owner: ClientStatements | None = None
    client_name: bytes = b""
    statement: PreparedStatement | None = None
    # The replies after this one's, up to the unit's ReadyForQuery, are the proxy's own.
    mute_rest: bool = False


class ServerLink:
    """The proxy's view of one server connection. See the module docstring."""

    __slots__ = ("prepared", "settings", "reported", "status", "max_prepared", "_units",
                 "_requests", "_unit_seq", "_sent", "_replied", "_dirty", "_stash",
                 "_remaining", "_drop_current",
                 "param_updates", "dropped_errors", "error_names", "replace_errors",
                 "_quiet_ready", "rows", "errors")

    def __init__(self, max_prepared: int = 200) -> None:
        self.prepared: OrderedDict[bytes, None] = OrderedDict()  # LRU of server-side names
        self.settings: dict[str, str] = {}  # session settings applied to this connection
        self.reported: dict[str, str] = {}  # every ParameterStatus value, as the server spells it
        self.status = b"I"  # the last ReadyForQuery status: I, T or E
        self.max_prepared = max_prepared
        # Units awaiting their Z: (unit id, forward replies, forward ParameterStatus, how many
        # Parse and Close requests had been sent when the unit closed).
        self._units: deque[tuple[int, bool, bool, int]] = deque()
        # Only the requests whose reply needs handling (dropped, or statements to track);
        # the others are just counted.
        self._requests: deque[_Request] = deque()
        self._sent = 0
        self._replied = 0
        self._unit_seq = 0
        self._dirty = False  # messages sent since the last Sync/Query
        self._stash = b""  # an incomplete header or inspected message
        self._remaining = 0  # bytes still to come of a message being streamed
        self._drop_current = False
        # Settable parameters that the client's own statements changed (SET TimeZone...).
        self.param_updates: list[tuple[str, str]] = []
        # ErrorResponse payloads of the proxy's own statements (their replies are dropped).
        self.dropped_errors: list[bytes] = []
        # Server-side names to show as the client's own in error messages (42P05).
        self.error_names: dict[bytes, bytes] = {}
        # Errors to show instead of the server's, by unit: a refusal of the proxy's own sent as
        # a failing message so that it arrives in order and aborts the transaction as
        # PostgreSQL's own error would.
        self.replace_errors: dict[int, bytes] = {}
        self._quiet_ready: set[int] = set()  # units whose ReadyForQuery the client never asked
        # Heat statistics (rebalancer/heat.py), taken and zeroed by the server connection: rows
        # that CommandComplete tags report, and ErrorResponses.
        self.rows = 0
        self.errors = 0

    # -- requests ---------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No reply is due, no batch is half sent and no transaction is open."""
        return not self._units and not self._dirty and self.status == b"I"

    @property
    def busy(self) -> bool:
        return bool(self._units) or self._dirty

    def note_sent(self, ends_unit: bool) -> None:
        """The client's messages were sent; `ends_unit` if the last was a Sync or Query."""
        if ends_unit:
            self._close_unit(True)
        else:
            self._dirty = True

    def _close_unit(self, forward: bool, params: bool | None = None) -> None:
        self._units.append((self._unit_seq, forward, forward if params is None else params,
                            self._sent))
        self._unit_seq += 1
        self._dirty = False

    def expect_parse(self, name: bytes, forward: bool, owner: ClientStatements | None = None,
                     client_name: bytes = b"", statement: PreparedStatement | None = None
                     ) -> None:
        if name or owner is not None or not forward:
            self._requests.append(_Request(_PARSE_DONE, name, forward, self._sent, owner,
                                           client_name, statement))
            if name:
                self.prepared[name] = None
        self._sent += 1

    def expect_close(self, name: bytes, forward: bool, owner: ClientStatements | None = None,
                     client_name: bytes = b"", statement: PreparedStatement | None = None
                     ) -> None:
        if name or owner is not None or not forward:
            self._requests.append(_Request(_CLOSE_DONE, name, forward, self._sent, owner,
                                           client_name, statement))
            if name:
                self.prepared.pop(name, None)
        self._sent += 1

    def settings_query(self, wanted: dict[str, str], *, tell_client: bool = False
                       ) -> bytes | None:
        """A Query that makes this connection's settings those of `wanted`, or None if they
        already are. Its replies are dropped, except the ParameterStatus messages when
        `tell_client` (settings restored after the client's own RESET ALL)."""
        have = self.settings
        if have == wanted:
            return None
        parts = []
        for name, value in wanted.items():
            if have.get(name) != value:
                sql_value = value if isinstance(value, RawSql) else quote_literal(value)
                parts.append(f"SET {quote_ident(name)} TO {sql_value}")
        for name in have:
            if name not in wanted:
                parts.append(f"RESET {quote_ident(name)}")
        self.settings = dict(wanted)
        return self.internal_query("; ".join(parts), tell_client=tell_client)

    def internal_query(self, sql: str, *, tell_client: bool = False) -> bytes:
        """A Query of the proxy's own, whose replies are dropped (errors are kept in
        `dropped_errors`)."""
        self.dropped_errors.clear()
        self._close_unit(False, tell_client)
        return m.query(sql)

    @property
    def batch_open(self) -> bool:
        """Messages of the client's went out since its last Sync (or Query)."""
        return self._dirty

    @property
    def client_units_due(self) -> bool:
        """A reply to a Sync or Query of the client's is still due (not only the proxy's
        own statements, nor a Sync of the proxy's that closed the client's Parse and Describe
        quietly, which leaves the state as it was): until it comes, `status` may not be the
        connection's state."""
        quiet = self._quiet_ready
        return any(unit[1] and unit[0] not in quiet for unit in self._units)

    @property
    def open_batch_only(self) -> bool:
        """Nothing is due but the replies of an extended batch the client has not closed."""
        return self._dirty and not self._units

    def end_batch_quietly(self) -> bytes:
        """A Sync of the proxy's own that closes the client's open batch (Parse and Describe
        answered after a Flush, say) so the connection can go back to the pool: the replies
        still due are passed on, the ReadyForQuery is not."""
        self._quiet_ready.add(self._unit_seq)
        self._close_unit(True)
        return m.SYNC

    def begin_in_batch(self) -> bytes:
        """BEGIN run inside the client's open batch (Parse, Bind and Execute of the unnamed
        statement and portal), which makes the batch's implicit transaction a transaction
        block holding the statements before it; then a Sync, which now does not commit.
        Every reply after those of the client's messages is dropped: if a statement of the
        batch failed, the server skips the BEGIN, and the ReadyForQuery says `I`; else `T`.
        The caller prepares the client's unnamed statement again before it is next bound."""
        self._requests.append(_Request(_PARSE_DONE, b"", False, self._sent, mute_rest=True))
        self._sent += 1
        self._dirty = True
        return _BEGIN_IN_BATCH + self.end_batch_quietly()

    def inject_unnamed_parse(self, parse_body: bytes) -> bytes:
        """The client's unnamed statement, prepared again on this connection (which did not
        get the client's own Parse); its reply is dropped."""
        self.expect_parse(b"", False)
        self._dirty = True
        return m.message(b"P", b"\x00" + parse_body)

    def refusal(self, error: bytes, *, own_unit: bool) -> bytes:
        """Messages that make the server fail in order, the failure shown as `error` (a whole
        ErrorResponse). `own_unit`: they end with a Sync of their own (in place of a Query);
        otherwise they join the client's open batch, whose Sync comes later (the first
        failure of a batch is the one shown: the server skips the rest up to the Sync)."""
        self.replace_errors.setdefault(self._unit_seq, error)
        bind = m.message(b"B", b"\x00" + _REFUSED_NAME + b"\x00\x00\x00\x00\x00\x00\x00")
        self._dirty = True
        if own_unit:
            self._close_unit(True)
            return bind + m.SYNC
        return bind

    def replace_running_error(self, error: bytes) -> bool:
        """Show `error` (a whole ErrorResponse) in place of the error the unit running now
        will end with, if any (a statement the proxy cancels, say). False: nothing runs."""
        if not self._units:
            return False
        self.replace_errors[self._units[0][0]] = error
        return True

    def forget_session_state(self) -> None:
        """After DISCARD ALL: nothing is prepared and the settings are the server's defaults."""
        self.prepared.clear()
        self.settings = {}

    # -- replies ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes | bytearray:
        """Take bytes from the server; return the bytes to pass on to the client."""
        if self._stash:
            data = self._stash + data
            self._stash = b""
        n = len(data)
        pos = 0
        out: bytearray | None = None
        run = 0  # start of the current run of bytes to forward
        if self._remaining:
            take = self._remaining if self._remaining < n else n
            self._remaining -= take
            pos = take
            if self._drop_current:
                run = pos
        units = self._units
        unit_forward = units[0][1] if units else True
        while pos < n:
            if n - pos < 5:
                self._stash = data[pos:]
                break
            kind = data[pos]
            length = _LEN(data, pos + 1)[0]
            if length < 4:
                raise BackendProtocolError(f"message length {length} for type {kind}")
            end = pos + 1 + length
            forward = unit_forward
            if kind in _INSPECT:
                if end > n:
                    self._stash = data[pos:]
                    break
                if kind == _COMPLETE:
                    # "SELECT 5", "INSERT 0 5", "UPDATE 5": a last word of digits (< "A")
                    # counts the rows; one digit, the common case, is read without int().
                    last = data[end - 2]
                    if last < 65:
                        if data[end - 3] == 32 and last > 47:
                            self.rows += last - 48
                        else:
                            try:
                                self.rows += int(data[data.rfind(32, pos + 5, end) + 1:end - 1])
                            except ValueError:
                                pass  # not a tag PostgreSQL sends
                elif kind == _Z:
                    forward = self._ready(data[pos + 5:end])
                    unit_forward = units[0][1] if units else True
                elif kind == _PARAM:
                    forward = units[0][2] if units else True
                    self._param(data[pos + 5:end], forward)
                elif kind == _ERROR:
                    self.errors += 1
                    if not forward:
                        self.dropped_errors.append(data[pos + 5:end])
                    elif self.replace_errors and (
                            (units[0][0] if units else self._unit_seq) in self.replace_errors):
                        unit = units[0][0] if units else self._unit_seq
                        if out is None:
                            out = bytearray()
                        out += data[run:pos]
                        out += self.replace_errors.pop(unit)
                        run = end
                    elif self.error_names:
                        renamed = self._rename_in_error(data[pos + 5:end])
                        if renamed is not None:
                            if out is None:
                                out = bytearray()
                            out += data[run:pos]
                            out += m.message(b"E", renamed)
                            run = end
                else:
                    seq = self._replied
                    if seq >= self._sent:
                        raise BackendProtocolError(f"reply {chr(kind)!r} that no request "
                                                   "asked for")
                    self._replied = seq + 1
                    reqs = self._requests
                    if reqs and reqs[0].seq == seq:
                        req = reqs.popleft()
                        if req.kind != kind:
                            raise BackendProtocolError(f"unexpected reply {chr(kind)!r}")
                        forward = forward and req.forward
                        if req.mute_rest:
                            unit_forward = False
                            units[0] = (units[0][0], False, False, units[0][3])
            elif end > n:
                self._remaining = end - n
                self._drop_current = not forward
                if not forward:
                    if out is None:
                        out = bytearray()
                    out += data[run:pos]
                    run = n
                pos = n
                break
            if not forward:
                if out is None:
                    out = bytearray()
                out += data[run:pos]
                run = end
            pos = end
        stop = n - len(self._stash)
        if out is None:
            return data if run == 0 and stop == n else data[run:stop]
        out += data[run:stop]
        return out

    def _ready(self, payload: bytes) -> bool:
        if not self._units:
            raise BackendProtocolError("ReadyForQuery that no request asked for")
        unit, forward, _, sent = self._units.popleft()
        if self.replace_errors:
            self.replace_errors.pop(unit, None)
        if self._quiet_ready and unit in self._quiet_ready:
            self._quiet_ready.discard(unit)
            forward = False
        self.status = payload[:1]
        # Requests of this unit still without a reply were failed or skipped by the server.
        self._replied = sent
        reqs = self._requests
        while reqs and reqs[0].seq < sent:
            req = reqs.popleft()
            # Undo what sending it assumed.
            parse = req.kind == _PARSE_DONE
            if req.name:
                if parse:
                    self.prepared.pop(req.name, None)
                else:
                    self.prepared[req.name] = None
            if req.owner is not None and req.statement is not None:
                defined = req.owner.statements
                if parse:
                    if defined.get(req.client_name) is req.statement:
                        del defined[req.client_name]
                else:
                    defined.setdefault(req.client_name, req.statement)
        if self.error_names and not self._units:
            self.error_names.clear()
        return forward

    def _rename_in_error(self, payload: bytes) -> bytes | None:
        for server_name, client_name in self.error_names.items():
            quoted = b'"' + server_name + b'"'
            if quoted in payload:
                return payload.replace(quoted, b'"' + client_name + b'"')
        return None

    def _param(self, payload: bytes, forward: bool) -> None:
        name, _, rest = payload.partition(b"\x00")
        value = rest.partition(b"\x00")[0].decode("utf-8", "replace")
        name_text = name.decode("utf-8", "replace")
        self.reported[name_text] = value
        key = name_text.lower()
        if forward and key in SETTABLE_REPORTED:
            # The client changed it (SET, RESET, or a rollback undoing a SET).
            self.settings[key] = value
            self.param_updates.append((key, value))


@dataclass(frozen=True, slots=True)
class PreparedStatement:
    server_name: bytes
    parse_body: bytes  # the Parse payload after the statement name: query, NUL, param types
    sql: bytes


def statement_name(parse_body: bytes) -> bytes:
    """A server-side name derived from the statement text and parameter types, so clients
    that prepare the same statement share it on a server connection."""
    return b"sw_" + hashlib.blake2b(parse_body, digest_size=10).hexdigest().encode()


class ClientStatements:
    """A client's named prepared statements, and the rewriting of its messages."""

    __slots__ = ("statements",)

    def __init__(self) -> None:
        self.statements: dict[bytes, PreparedStatement] = {}

    def rewrite(self, msgs: list[tuple[int, bytes]], link: ServerLink,
                original: bytes | None) -> bytes:
        """The bytes to send to the server for the client's `msgs` (complete messages).

        `original` is the raw bytes of exactly these messages when the caller has them: when
        nothing needs rewriting it is returned as is.
        """
        parts: list[bytes] | None = None
        for i, (kind, body) in enumerate(msgs):
            new = self._rewrite_one(kind, body, link) if kind in _REWRITTEN else None
            if new is not None:
                if parts is None:
                    parts = [m.message(bytes((k,)), b) for k, b in msgs[:i]]
                parts.append(new)
            elif parts is not None:
                parts.append(m.message(bytes((kind,)), body))
            if kind in _ENDS_UNIT:
                link.note_sent(True)
            elif kind in _OPENS_BATCH:
                link.note_sent(False)
        if parts is None:
            if original is not None:
                return original
            return b"".join(m.message(bytes((k,)), b) for k, b in msgs)
        return b"".join(parts)

    def _rewrite_one(self, kind: int, body: bytes, link: ServerLink) -> bytes | None:
        """The replacement bytes for one message, or None to send it unchanged."""
        if kind == 0x42:  # Bind: portal NUL statement NUL ...
            p = body.index(0)
            s = body.index(0, p + 1)
            name = body[p + 1:s]
            if not name:
                return None
            stmt = self.statements.get(name)
            if stmt is None:
                return None  # the server reports "prepared statement does not exist"
            pre = self._ensure(stmt, link)
            return pre + m.message(b"B", body[:p + 1] + stmt.server_name + body[s:])
        if kind == 0x50:  # Parse: name NUL query NUL types
            s = body.index(0)
            name = body[:s]
            if not name:
                link.expect_parse(b"", True)
                return None
            rest = body[s + 1:]
            if name in self.statements:
                # PostgreSQL refuses to redefine a name: let the server say so by parsing the
                # statement's server name twice, and show the client's name in its error.
                stmt = self.statements[name]
                pre = self._ensure(stmt, link)
                link.expect_parse(b"", True)
                link.error_names[stmt.server_name] = name
                return pre + m.message(b"P", stmt.server_name + b"\x00" + rest)
            server_name = statement_name(rest)
            stmt = PreparedStatement(server_name, rest, rest[:rest.index(0)])
            # Defined now so that a Bind later in the batch finds it; undone if the server
            # fails or skips the Parse.
            self.statements[name] = stmt
            if server_name in link.prepared:
                link.prepared.move_to_end(server_name)
                # Already there: acknowledge with a throwaway Parse the server answers in order.
                link.expect_parse(b"", True, self, name, stmt)
                link.expect_close(b"", False)
                return (m.message(b"P", _ACK_NAME + b"\x00\x00\x00\x00")
                        + m.close_statement(_ACK_NAME))
            evict = self._evict(link, 1)
            link.expect_parse(server_name, True, self, name, stmt)
            return evict + m.message(b"P", server_name + b"\x00" + rest)
        if kind == 0x44:  # Describe: 'S' or 'P', name NUL
            if body[0] != 0x53 or len(body) <= 2:
                return None
            stmt = self.statements.get(body[1:-1])
            if stmt is None:
                return None
            return self._ensure(stmt, link) + m.message(b"D", b"S" + stmt.server_name + b"\x00")
        if kind == 0x43:  # Close
            if body[0] != 0x53 or len(body) <= 2:
                link.expect_close(b"", True)
                return None
            client_name = body[1:-1]
            stmt = self.statements.pop(client_name, None)
            link.expect_close(b"", True, self, client_name, stmt)
            if stmt is None:
                return None
            # Other clients may share the server's statement: keep it, and close a name that
            # does not exist so the server still answers CloseComplete.
            return m.close_statement(_CLOSED_NAME)
        return None

    def _ensure(self, stmt: PreparedStatement, link: ServerLink) -> bytes:
        """Bytes that prepare `stmt` on the server first, if it does not have it."""
        if stmt.server_name in link.prepared:
            link.prepared.move_to_end(stmt.server_name)
            return b""
        evict = self._evict(link, 1)
        link.expect_parse(stmt.server_name, False)
        return evict + m.message(b"P", stmt.server_name + b"\x00" + stmt.parse_body)

    def _evict(self, link: ServerLink, room: int) -> bytes:
        if link.max_prepared <= 0:
            return b""
        over = len(link.prepared) + room - link.max_prepared
        if over <= 0:
            return b""
        names = list(link.prepared)[:over]
        out = []
        for name in names:
            link.expect_close(name, False)
            out.append(m.close_statement(name))
        return b"".join(out)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
