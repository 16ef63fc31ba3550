"""Run `shardwire serve` as a child process, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .cluster import free_port


class ProxyProcess:
    """A proxy started from a config dict (written to `workdir/shardwire.yaml`); with
    `workers` > 1, `serve --workers N` (proxy/workers.py)."""

    def __init__(self, config: Mapping[str, Any], workdir: str | Path, *,
                 env: Mapping[str, str] | None = None, log_level: str = "info",
                 workers: int = 1, wrapper: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = dict(config)
        listen = dict(cfg.get("listen") or {})
        listen.setdefault("host", "127.0.0.1")
        listen.setdefault("port", free_port())
        cfg["listen"] = listen
        self.config = cfg
        self.host = str(listen["host"])
        self.port = int(listen["port"])
        self.config_path = self.workdir / "shardwire.yaml"
        self.log_path = self.workdir / "proxy.log"
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.log_level = log_level
        self.workers = workers
        self.wrapper = list(wrapper)  # a command the proxy runs under (valgrind, say)
        self.ready_line = b""  # what the proxy printed when it was ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(cfg)

    def write_config(self, config: Mapping[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))

    def start(self, timeout: float = 20) -> ProxyProcess:
        args = [*self.wrapper, sys.executable, "-m", "shardwire.cli", "serve", "--config",
                str(self.config_path), "--log-level", self.log_level]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=self.env)
        ready = threading.Event()
        out = self.proc.stdout
        assert out is not None

        def watch() -> None:
            for line in out:
                if b"ready" in line and not ready.is_set():
                    self.ready_line = line
                    ready.set()

        threading.Thread(target=watch, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"shardwire did not start:\n{self.log_tail()}")
        return self

    def dsn(self, user: str = "app", password: str | None = None, database: str = "app",
            **params: str) -> str:
        auth = user if password is None else f"{user}:{password}"
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}" + (
            f"?{query}" if query else "")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10) -> None:
        """Stop at once: SIGINT (SIGTERM would let open transactions run on for up to
        `shutdown_timeout`, which tests test on their own)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ProxyProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
