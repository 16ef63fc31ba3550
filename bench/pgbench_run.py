"""Running ``pgbench -S`` once and reading what it reports.

The parsing functions are pure: they take pgbench's output or the lines of its
per-transaction log and return numbers, so they can be checked without a server.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shardwire.testing import pg_bindir

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
# "client 4 script 0 aborted in command 1 query 0: ERROR: ..." (PostgreSQL 15 and later)
# or "client 4 aborted in command 1 (SQL) of script 0; ERROR: ..." (before).
_ABORTED = re.compile(r"client \d+ (?:script \d+ )?aborted in command \d+[^:;]*[:;]\s*")


@dataclass(frozen=True, slots=True)
class Target:
    """Somewhere pgbench connects to: the server itself or a proxy in front of it."""

    name: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    tps: float | None  # None when pgbench printed no result at all
    transactions: int
    failed: int  # transactions pgbench counted as failed (serialization, deadlock)
    aborted_clients: int  # clients pgbench gave up on after any other error
    errors: tuple[tuple[str, int], ...]  # what went wrong, with how often, for the report
    p50_ms: float | None
    p99_ms: float | None
    returncode: int
    # Share of the machine's CPU that processes outside the benchmark used meanwhile.
    other_cpu: float | None = None
    # CPU the pooler in between used meanwhile, as a share of one core (None for direct).
    pooler_cpu: float | None = None


def pgbench_program() -> str:
    """The pgbench of the PostgreSQL the harness runs, else the one on PATH."""
    candidate = pg_bindir() / "pgbench"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("pgbench")
    if found is None:
        raise RuntimeError("pgbench not found: install the PostgreSQL client programs")
    return found


def clean_env() -> dict[str, str]:
    # PGHOST, PGOPTIONS and friends from the caller's shell must not redirect the runs.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}


def initialise(target: Target, *, user: str, database: str, scale: int) -> None:
    """``pgbench -i``: create and fill the pgbench tables."""
    args = [
        pgbench_program(), "-i", "-q", "-s", str(scale),
        "-h", target.host, "-p", str(target.port), "-U", user, database,
    ]  # fmt: skip
    result = subprocess.run(args, env=clean_env(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pgbench -i failed ({result.returncode}):\n{result.stderr}")


def run_select_only(
    target: Target,
    *,
    protocol: str,
    clients: int,
    seconds: int,
    log_dir: Path,
    user: str,
    database: str,
    tag: str = "run",
) -> PgbenchResult:
    """One ``pgbench -S`` run against ``target`` with a per-transaction log in ``log_dir``.

    The per-transaction log files are read and removed before returning; what pgbench
    printed stays in ``log_dir/<tag>.out``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = log_dir / "x"
    args = [
        pgbench_program(), "-S", "-n", "-M", protocol, "-c", str(clients),
        "-j", str(min(clients, 2)), "-T", str(seconds), "-l", f"--log-prefix={prefix}",
        "-h", target.host, "-p", str(target.port), "-U", user, database,
    ]  # fmt: skip
    result = subprocess.run(
        args,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=seconds + 120,
    )
    (log_dir / f"{tag}.out").write_text(
        f"$ {' '.join(args)}\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    logs = sorted(log_dir.glob("x.*"))
    latencies = sorted(latencies_us(_lines(logs)))
    for log in logs:
        log.unlink()
    summary = parse_summary(result.stdout, result.stderr)
    return PgbenchResult(
        tps=summary.tps,
        transactions=summary.transactions,
        failed=summary.failed,
        aborted_clients=summary.aborted_clients,
        errors=summary.errors,
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        returncode=result.returncode,
    )


def warm_up(
    targets: Iterable[Target], *, seconds: int, log_dir: Path, user: str, database: str
) -> None:
    """A short ``pgbench -S -c 8`` through each target before the measured runs: pools
    filled, caches warm, the servers' pages in memory."""
    for target in targets:
        print(f"warm-up {target.name}", file=sys.stderr, flush=True)
        run_select_only(
            target, protocol="simple", clients=8, seconds=seconds, log_dir=log_dir,
            user=user, database=database, tag=f"warmup-{target.name}",
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Summary:
    tps: float | None
    transactions: int
    failed: int
    aborted_clients: int
    errors: tuple[tuple[str, int], ...]


def parse_summary(stdout: str, stderr: str) -> Summary:
    """The figures pgbench prints at the end of a run, and what it complained about.

    >>> s = parse_summary(
    ...     "number of transactions actually processed: 1200\\n"
    ...     "number of failed transactions: 0 (0.000%)\\n"
    ...     "tps = 120.5 (without initial connection time)\\n",
    ...     'pgbench: error: ERROR:  prepared statement "P_0" already exists\\n'
    ...     "pgbench: error: client 3 script 0 aborted in command 1 query 0: "
    ...     'ERROR:  prepared statement "P_0" does not exist\\n'
    ...     "pgbench:pgbench:  error: client 5 script 0 aborted in command 1 query 0: "
    ...     'ERROR:  prepared statement "P_0" does not exist\\n'
    ...     "error: client 6 script 0 aborted in command 1 query 0: "
    ...     'ERROR:  prepared statement "P_0" does not exist\\n'
    ...     "pgbench: error: Run was aborted; the above results are incomplete.\\n")
    >>> (s.tps, s.transactions, s.failed, s.aborted_clients)
    (120.5, 1200, 0, 3)
    >>> for text, count in s.errors: print(count, text)
    1 ERROR:  prepared statement "P_0" already exists
    3 aborted: ERROR:  prepared statement "P_0" does not exist
    """
    tps = _TPS.search(stdout)
    processed = _PROCESSED.search(stdout)
    failed = _FAILED.search(stdout)
    aborted = 0
    errors: dict[str, int] = {}
    for line in stderr.splitlines():
        text = line.strip().removeprefix("pgbench: error: ")
        if not text or text.startswith("Run was aborted"):
            continue
        # With -j 2 both threads write to stderr, and their lines can come out spliced
        # ("pgbench:pgbench:  error: client 2 ..."): look for the parts, not the line start.
        abort = _ABORTED.search(text)
        if abort:
            # The client number would make every abort distinct: keep what the server said.
            aborted += 1
            text = "aborted: " + text[abort.end() :]
        elif "ERROR:" in text:
            text = text[text.index("ERROR:") :]
        errors[text] = errors.get(text, 0) + 1
    return Summary(
        tps=float(tps.group(1)) if tps else None,
        transactions=int(processed.group(1)) if processed else 0,
        failed=int(failed.group(1)) if failed else 0,
        aborted_clients=aborted,
        errors=tuple(errors.items()),
    )


def _lines(paths: Sequence[Path]) -> Iterable[str]:
    for path in paths:
        with path.open(encoding="ascii", errors="replace") as log:
            yield from log


def latencies_us(lines: Iterable[str]) -> list[int]:
    """Transaction latencies (the third column, in µs) from pgbench's per-transaction log.

    Failed and skipped transactions have a word instead of a number there and are left out.

    >>> latencies_us(["0 1 250 0 1700000000 12\\n", "1 7 failed 0 1700000000 13\\n"])
    [250]
    """
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2].isdigit():
            found.append(int(fields[2]))
    return found


def percentile_ms(sorted_us: Sequence[int], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted microsecond latencies, in milliseconds.

    >>> percentile_ms([100, 200, 300, 400], 0.5), percentile_ms([100, 200, 300, 400], 0.99)
    (0.2, 0.4)
    """
    if not sorted_us:
        return None
    rank = max(1, math.ceil(round(len(sorted_us) * fraction, 9)))
    return sorted_us[rank - 1] / 1000.0
