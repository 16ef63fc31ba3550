"""From single pgbench runs to the medians, the targets and the three outputs.

Every figure in a row is a median over the rounds. A ratio or an added latency is computed
within each round first (the three targets of one round run back to back) and the median is
taken of those, so a slow round does not pair with a fast one.

The helpers under "shared by the benchmark scripts" (figures as text, tables, the order of
the runs in a round, the machine's description) serve every script in bench/.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from idle_clients import IdleCost
from pgbench_run import PgbenchResult

import shardwire
from shardwire.testing import PostgresCluster
from shardwire.testing.proxy import ProxyProcess

DIRECT, PGBOUNCER, SHARDWIRE = "direct", "pgbouncer", "shardwire"
TARGETS = (DIRECT, PGBOUNCER, SHARDWIRE)
BENCHMARK = "pgbench-S"
IDLE_TARGET_MIB = 100

START_MARKER = "<!-- bench:pgbench-S:start -->"
END_MARKER = "<!-- bench:pgbench-S:end -->"


@dataclass(frozen=True, slots=True)
class Workload:
    protocol: str  # simple or prepared
    clients: int


@dataclass(frozen=True, slots=True)
class Goal:
    """A target from the issue, for one workload."""

    text: str
    kind: str  # "ratio": Shardwire/PgBouncer TPS at least bound; "latency": added p50 at most
    bound: float


def goal_for(workload: Workload) -> Goal | None:
    if workload.clients == 8 and workload.protocol == "prepared":
        return Goal("TPS ≥ 0.8× PgBouncer", "ratio", 0.8)
    if workload.clients == 8 and workload.protocol == "simple":
        return Goal("TPS ≥ 0.6× PgBouncer", "ratio", 0.6)
    if workload.clients == 1:
        return Goal("added p50 ≤ 1.5× PgBouncer's", "latency", 1.5)
    return None


@dataclass(frozen=True, slots=True)
class Row:
    workload: Workload
    rounds: tuple[Mapping[str, PgbenchResult], ...]  # one {target: result} per round

    def median(self, pick: Callable[[Mapping[str, PgbenchResult]], float | None]) -> float | None:
        return median_of(pick(r) for r in self.rounds)

    def tps(self, target: str) -> float | None:
        return self.median(lambda r: r[target].tps)

    def p50(self, target: str) -> float | None:
        return self.median(lambda r: r[target].p50_ms)

    def p99(self, target: str) -> float | None:
        return self.median(lambda r: r[target].p99_ms)

    def added_p50(self, target: str) -> float | None:
        """How much later than direct the median transaction finished through ``target``."""

        def added(r: Mapping[str, PgbenchResult]) -> float | None:
            through, direct = r[target].p50_ms, r[DIRECT].p50_ms
            return None if through is None or direct is None else through - direct

        return self.median(added)

    @property
    def ratio_to_pgbouncer(self) -> float | None:
        def ratio(r: Mapping[str, PgbenchResult]) -> float | None:
            ours, theirs = r[SHARDWIRE].tps, r[PGBOUNCER].tps
            return None if ours is None or not theirs else ours / theirs

        return self.median(ratio)

    def failed(self, target: str) -> int:
        return sum(r[target].failed for r in self.rounds)

    def aborted(self, target: str) -> int:
        return sum(r[target].aborted_clients for r in self.rounds)

    def errors(self, target: str) -> list[tuple[str, int]]:
        """What pgbench complained about through ``target``, with counts over all rounds."""
        counts: dict[str, int] = {}
        for r in self.rounds:
            for text, count in r[target].errors:
                counts[text] = counts.get(text, 0) + count
        return list(counts.items())

    def other_cpu_max(self) -> float | None:
        """The largest share of the CPU other processes took during any run of this row."""
        shares = [r[t].other_cpu for r in self.rounds for t in TARGETS]
        known = [share for share in shares if share is not None]
        return max(known) if known else None

    def pooler_cpu(self, target: str) -> float | None:
        return self.median(lambda r: r[target].pooler_cpu)

    def to_direct(self, target: str) -> float | None:
        def ratio(r: Mapping[str, PgbenchResult]) -> float | None:
            ours, direct = r[target].tps, r[DIRECT].tps
            return None if ours is None or not direct else ours / direct

        return self.median(ratio)

    @property
    def goal(self) -> Goal | None:
        return goal_for(self.workload)

    @property
    def goal_value(self) -> float | None:
        """The measured figure the goal is about: a TPS ratio, or added p50 ÷ PgBouncer's."""
        goal = self.goal
        if goal is None:
            return None
        if goal.kind == "ratio":
            return self.ratio_to_pgbouncer
        ours, theirs = self.added_p50(SHARDWIRE), self.added_p50(PGBOUNCER)
        if ours is None or theirs is None or theirs <= 0:
            return None
        return ours / theirs

    @property
    def met(self) -> bool | None:
        goal, value = self.goal, self.goal_value
        if goal is None or value is None:
            return None
        return value >= goal.bound if goal.kind == "ratio" else value <= goal.bound

    @property
    def comparable(self) -> bool:
        """False when PgBouncer lost clients, which makes its TPS (and our ratio) meaningless."""
        return self.aborted(PGBOUNCER) == 0 and all(r[PGBOUNCER].tps for r in self.rounds)

    @property
    def name(self) -> str:
        return f"{BENCHMARK}/{self.workload.protocol}/c{self.workload.clients}"


# --- shared by the benchmark scripts --------------------------------------------------------

T = TypeVar("T")


def num(value: float | None, digits: int = 0) -> str:
    """A figure with thousands separators; a dash when there is none.

    >>> num(12345.678), num(0.5, 2), num(None)
    ('12,346', '0.50', '—')
    """
    return "—" if value is None else f"{value:,.{digits}f}"


def ms(value: float | None) -> str:
    """Milliseconds to the microsecond."""
    return "—" if value is None else f"{value:.3f}"


def percent(share: float | None) -> str:
    """A share (0.25) as a whole percentage (25%)."""
    return "—" if share is None else f"{share * 100:.0f}%"


def round3(value: float | None) -> float | None:
    """For the JSON outputs: three decimals are more than any of these figures can carry."""
    return None if value is None else round(value, 3)


def median_of(values: Iterable[float | None]) -> float | None:
    """The median of the values that were measured (None: not measured)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def max_of(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def rotate(items: Sequence[T], shift: int) -> list[T]:
    """``items`` starting at ``shift``: each round and workload starts with another setup,
    so none of them always runs first after a pause or last on a warm machine.

    >>> rotate("abc", 1), rotate("abc", 5)
    (['b', 'c', 'a'], ['c', 'a', 'b'])
    """
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


class Progress:
    """One line on stderr per finished run: how many of how many, and the seconds so far."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        print(f"[{self.done}/{self.total} {elapsed:.0f}s] {text}", file=sys.stderr, flush=True)


def table_text(
    headers: Sequence[str], lines: Sequence[Sequence[str]], *, right: Collection[int] = ()
) -> str:
    """A table for the terminal; the columns in ``right`` are right-aligned.

    >>> print(table_text(("a", "bb"), [("x", "1"), ("yy", "22")], right=(1,)))
    a   bb
    --  --
    x    1
    yy  22
    """
    table = [list(headers), *(list(line) for line in lines)]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    out = []
    for n, line in enumerate(table):
        out.append(
            "  ".join(
                c.rjust(w) if i in right and n else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def table_markdown(
    headers: Sequence[str], lines: Sequence[Sequence[str]], *, text: Collection[int]
) -> str:
    """A Markdown table whose columns are right-aligned (numbers) except those in ``text``.

    >>> print(table_markdown(("a", "n"), [("x", "1")], text=(0,)))
    | a | n |
    | --- | ---: |
    | x | 1 |
    """
    out = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" if i in text else "---:" for i in range(len(headers))) + " |",
    ]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def machine() -> tuple[str, str, str]:
    """The CPU model, the memory ("23.5 GiB RAM") and the kernel ("Linux 6.1.0")."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )  # fmt: skip
    meminfo = Path("/proc/meminfo").read_text().split()
    memory_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024 / 1024
    return cpu, f"{memory_gib:.1f} GiB RAM", f"Linux {platform.release()}"


def machine_line() -> str:
    """Cores, CPU model, memory and kernel, as the docs sections print them."""
    return f"{len(os.sched_getaffinity(0))} cores, " + ", ".join(machine())


def shardwire_source() -> str:
    """Which Shardwire ran (the proxies import the one this process imports): the
    repository's revision, or the directory it came from when PYTHONPATH points elsewhere."""
    package = Path(shardwire.__file__).resolve().parent
    repo = Path(__file__).resolve().parent.parent
    if not package.is_relative_to(repo):
        return f"imported from {package.parent}"
    try:
        revision = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except OSError:
        revision = ""
    return f"git {revision}" if revision else f"from {package.parent}"


def postmaster_pid(cluster: PostgresCluster) -> int | None:
    """The server's postmaster, from its postmaster.pid; None when it is not running."""
    try:
        return int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_all(stops: Iterable[Callable[[], None] | None]) -> None:
    """Each in turn, whatever the one before did: nothing may outlive the benchmark. A second
    Ctrl-C during a stop does not skip it."""
    for stop in stops:
        if stop is None:
            continue
        try:
            try:
                stop()
            except KeyboardInterrupt:
                stop()
        except Exception as exc:  # report it and go on stopping the rest
            print(f"while stopping: {exc}", file=sys.stderr, flush=True)


def connect(host: str, port: int, *, user: str, database: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=host, port=port, user=user, dbname=database, autocommit=True, connect_timeout=10
    )


def show_route(host: str, port: int, sql: str, *, user: str, database: str) -> dict[str, str]:
    """What Shardwire's ``SHOW ROUTE FOR sql`` answers, column by column."""
    with connect(host, port, user=user, database=database) as conn:
        cursor = conn.execute(f"SHOW ROUTE FOR {sql}".encode())
        row = cursor.fetchone()
        names = [d.name for d in cursor.description or ()]
    if row is None:
        return {}
    return {n: "" if v is None else str(v) for n, v in zip(names, row, strict=True)}


def route_shards(route: Mapping[str, str]) -> list[str]:
    """The shard names of a SHOW ROUTE answer, sorted.

    >>> route_shards({"shards": "{s2,s1}"})
    ['s1', 's2']
    """
    text = route.get("shards", "")
    return sorted(text.replace("{", " ").replace("}", " ").replace(",", " ").split())


def proxy_log_note(name: str, proxy: ProxyProcess) -> str | None:
    """A note for the docs when the Shardwire called ``name`` logged anything at level warning
    or above (the benchmarks run it at warning: a quiet log is the normal case).

    >>> class Log:
    ...     def log_tail(self, lines): return "a INFO x\\nb WARNING slow\\nc ERROR boom"
    >>> proxy_log_note("the one-shard Shardwire", Log())  # type: ignore[arg-type]
    'the one-shard Shardwire logged 2 warnings or errors; the first: b WARNING slow'
    """
    problems = [
        line for line in proxy.log_tail(100_000).splitlines()
        if " WARNING " in line or " ERROR " in line or " CRITICAL " in line
    ]  # fmt: skip
    if not problems:
        return None
    return f"{name} logged {len(problems)} warnings or errors; the first: {problems[0]}"


# --- pgbench -S: direct, PgBouncer and Shardwire ------------------------------------------


def _trio(row: Row, pick: Callable[[str], float | None]) -> str:
    return " / ".join(ms(pick(t)) for t in TARGETS)


def _failures(row: Row, target: str) -> str:
    failed, aborted = row.failed(target), row.aborted(target)
    text = str(failed)
    return text + (f" (+{aborted} aborted)" if aborted else "")


def _met(row: Row) -> str:
    goal = row.goal
    if goal is None:
        return ""
    verdict = {True: "met", False: "MISSED", None: "n/a"}[row.met]
    if goal.kind == "ratio" and not row.comparable:
        verdict += ", but not comparable: PgBouncer aborted clients"
    return f"{goal.text}: {num(row.goal_value, 2)} {verdict}"


HEADERS = (
    "protocol", "clients", "direct tps", "pgbouncer tps", "shardwire tps", "sw/pgb", "sw/direct",
    "p50 ms d/pgb/sw", "p99 ms d/pgb/sw", "+p50 pgb", "+p50 sw", "cpu pgb/sw", "failed pgb/sw",
    "others' cpu", "target",
)  # fmt: skip


def cells(row: Row) -> list[str]:
    return [
        row.workload.protocol,
        str(row.workload.clients),
        num(row.tps(DIRECT)),
        num(row.tps(PGBOUNCER)),
        num(row.tps(SHARDWIRE)),
        num(row.ratio_to_pgbouncer, 2),
        num(row.to_direct(SHARDWIRE), 2),
        _trio(row, row.p50),
        _trio(row, row.p99),
        ms(row.added_p50(PGBOUNCER)),
        ms(row.added_p50(SHARDWIRE)),
        f"{percent(row.pooler_cpu(PGBOUNCER))} / {percent(row.pooler_cpu(SHARDWIRE))}",
        f"{_failures(row, PGBOUNCER)} / {_failures(row, SHARDWIRE)}",
        percent(row.other_cpu_max()),
        _met(row),
    ]


def text_table(rows: Sequence[Row]) -> str:
    return table_text(HEADERS, [cells(r) for r in rows], right=range(1, 7))


def markdown_table(rows: Sequence[Row]) -> str:
    return table_markdown(HEADERS, [cells(r) for r in rows], text=(0, len(HEADERS) - 1))


# --- JSON ---------------------------------------------------------------------------------


def _percent_value(share: float | None) -> float | None:
    return None if share is None else round(share * 100, 1)


def json_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One object per workload; a script comparing runs matches them by ``name``."""
    out = []
    for row in rows:
        item: dict[str, Any] = {
            "name": row.name,
            "protocol": row.workload.protocol,
            "clients": row.workload.clients,
            "direct_tps": round3(row.tps(DIRECT)),
            "pgbouncer_tps": round3(row.tps(PGBOUNCER)),
            "shardwire_tps": round3(row.tps(SHARDWIRE)),
            "ratio_to_pgbouncer": round3(row.ratio_to_pgbouncer),
            "pgbouncer_to_direct": round3(row.to_direct(PGBOUNCER)),
            "shardwire_to_direct": round3(row.to_direct(SHARDWIRE)),
        }
        for target in TARGETS:
            item[f"{target}_p50_ms"] = round3(row.p50(target))
            item[f"{target}_p99_ms"] = round3(row.p99(target))
        for target in (PGBOUNCER, SHARDWIRE):
            item[f"{target}_added_p50_ms"] = round3(row.added_p50(target))
        for target in (PGBOUNCER, SHARDWIRE):
            item[f"{target}_cpu_pct"] = _percent_value(row.pooler_cpu(target))
        for target in TARGETS:
            item[f"{target}_failed_transactions"] = row.failed(target)
            item[f"{target}_aborted_clients"] = row.aborted(target)
        goal = row.goal
        item["target"] = goal.text if goal else None
        item["target_value"] = round3(row.goal_value)
        item["target_met"] = row.met
        item["target_comparable"] = row.comparable if goal and goal.kind == "ratio" else True
        for target in TARGETS:
            item[f"{target}_errors"] = [{"message": t, "count": n} for t, n in row.errors(target)]
        item["rounds"] = [
            {
                target: {
                    "tps": round3(r[target].tps),
                    "p50_ms": r[target].p50_ms,
                    "p99_ms": r[target].p99_ms,
                    "failed": r[target].failed,
                    "aborted_clients": r[target].aborted_clients,
                    "pooler_cpu_pct": _percent_value(r[target].pooler_cpu),
                    "other_cpu_pct": _percent_value(r[target].other_cpu),
                }
                for target in TARGETS
            }
            for r in row.rounds
        ]
        out.append(item)
    return out


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# --- docs/benchmarks.md -------------------------------------------------------------------

_DOC_HEADER = """# Benchmarks

Each section below is written by a benchmark script between its `<!-- bench:... -->` markers
and rewritten on every run; text outside the markers is kept.
"""


def idle_line(name: str, cost: IdleCost | None) -> str:
    if cost is None:
        return f"{name}: not measured"
    return (
        f"{name}: {cost.rss_before_kib / 1024:.1f} MiB RSS before, "
        f"{cost.rss_after_kib / 1024:.1f} MiB with {cost.connections} idle clients: "
        f"+{cost.added_mib:.1f} MiB ({cost.per_connection_kib:.1f} KiB a connection; "
        f"open descriptors {cost.fds_before} → {cost.fds_after})"
    )


def markdown_section(
    rows: Sequence[Row],
    *,
    env: Mapping[str, str],
    idle: Mapping[str, IdleCost | None],
    notes: Sequence[str],
) -> str:
    sw_idle = idle.get(SHARDWIRE)
    idle_met = None if sw_idle is None else sw_idle.added_mib < IDLE_TARGET_MIB
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    goals = []
    for row in rows:
        if row.goal is not None:
            goals.append(
                f"- {row.workload.protocol}, {row.workload.clients} client"
                f"{'s' if row.workload.clients > 1 else ''}: {_met(row)}"
            )
    goals.append(
        f"- {idle_clients_count(idle)} idle clients cost Shardwire < {IDLE_TARGET_MIB} MiB RSS: "
        + ("—" if sw_idle is None else f"+{sw_idle.added_mib:.1f} MiB ")
        + verdict[idle_met]
    )
    parts = [
        START_MARKER,
        "## pgbench -S: direct, PgBouncer and Shardwire",
        "",
        f"Written by `make bench` (`bench/run.py`) on {env['date']}. Figures as JSON: "
        "`bench/results/latest.json` (one object per row below) and "
        "`bench/results/latest-run.json` (machine, memory, notes). `BENCH_SECONDS` sets the "
        "length of one pgbench run (default 10), `BENCH_ROUNDS` the rounds (default 3), and "
        "`BENCH_KEEP=1` keeps the work directory with pgbench's output and the poolers' logs.",
        "",
        f"- Machine: {env['cores']} cores, {env['cpu']}, {env['memory']}, {env['kernel']}",
        f"- Software: {env['postgres']}, {env['pgbouncer']}, Python {env['python']}, "
        f"Shardwire {env['shardwire']}",
        f"- Run: pgbench -S at scale {env['scale']} (database {env['db_size']}), "
        f"BENCH_SECONDS={env['seconds']} per run, {env['rounds']} "
        f"round{'' if env['rounds'] == '1' else 's'}; load average {env['loadavg']} before "
        f"the run, {env['loadavg_after']} after (other work on the machine skews the figures)",
        "",
        "What ran: one PostgreSQL server (fsync off, shared_buffers 64MB). In each round, "
        "for each protocol (`-M simple`, `-M prepared`) and client count (1, 8; `-j` = "
        "min(clients, 2)), pgbench ran against the server directly, through PgBouncer "
        f"(transaction mode, default_pool_size {env['pool_size']}) and through Shardwire "
        f"(transaction mode, pool.size {env['pool_size']}, log level warning), the order "
        "rotating from one run to the next. All three listen on 127.0.0.1 over TCP; pgbench "
        "and the poolers share the machine's cores. TPS excludes the initial connection time; "
        "p50/p99 come from pgbench's per-transaction log (`-l`). Every figure is the median "
        "over the rounds; sw/pgb and the added p50 (latency above direct) are computed "
        "within each round, then the median taken.",
        "",
        markdown_table(rows),
        "",
        "Latencies are in milliseconds, shown as direct / PgBouncer / Shardwire. "
        "*failed* counts pgbench's failed transactions over all rounds, and clients "
        "pgbench aborted after an error. *cpu* is the CPU time the pooler process used "
        "during its runs, as a share of one core (PgBouncer and Shardwire each serve "
        "clients on one thread, so near 100% means saturated). *others' cpu* is the "
        "largest share of the machine's CPU that processes outside the benchmark took "
        "during any run of the row: above a few percent, that row's figures are disturbed.",
        "",
        "Memory, idle client connections (logged in, then silent):",
        "",
        *(f"- {idle_line(name, cost)}" for name, cost in idle.items()),
        "",
        "Targets (medians on this machine):",
        "",
        *goals,
    ]
    if notes:
        parts += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    parts.append(END_MARKER)
    return "\n".join(parts) + "\n"


def idle_clients_count(idle: Mapping[str, IdleCost | None]) -> int:
    return next((c.connections for c in idle.values() if c is not None), 1000)


def replace_section(document: str, section: str) -> str:
    """``document`` with the benchmark section that ``section`` replaces (the text between
    ``section``'s own first and last lines, its markers, inclusive), or with ``section``
    appended when it has none yet.

    >>> replace_section("# B\\n\\n" + START_MARKER + "\\nold\\n" + END_MARKER + "\\ntail\\n",
    ...                 START_MARKER + "\\nnew\\n" + END_MARKER + "\\n")
    '# B\\n\\n<!-- bench:pgbench-S:start -->\\nnew\\n<!-- bench:pgbench-S:end -->\\ntail\\n'
    >>> replace_section("a\\n", "<!-- x:start -->\\ny\\n<!-- x:end -->\\n")
    'a\\n\\n<!-- x:start -->\\ny\\n<!-- x:end -->\\n'
    """
    if not document.strip():
        return _DOC_HEADER + "\n" + section
    lines = section.strip("\n").split("\n")
    start_marker, end_marker = lines[0], lines[-1]
    start = document.find(start_marker)
    end = document.find(end_marker, start + 1) if start >= 0 else -1
    if start < 0 or end < 0:
        return document.rstrip("\n") + "\n\n" + section
    end += len(end_marker)
    if document[end : end + 1] == "\n":
        end += 1
    return document[:start] + section + document[end:]


def write_docs(path: Path, section: str) -> None:
    try:
        document = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        document = ""
    path.write_text(replace_section(document, section), encoding="utf-8")
