"""Start ``python -m conch serve`` in a child process and wait for it (notebooks, make run, tests, bench)."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ConchError


def wait_until_healthy(url: str, process, timeout_s: float) -> str:
    """Poll ``url/health`` until it answers 200 ("ready"), the process ends ("exited") or time runs out ("timeout")."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        if process.poll() is not None:
            return "exited"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return "ready"
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            return "timeout"
        time.sleep(0.3)


def tunnel_command(port: int) -> str:
    """How to reach a server on a remote machine (AutoDL, a cloud GPU) from your own computer's browser: an SSH
    tunnel, which needs no open port (AutoDL's personal accounts reach services only this way)."""
    return (f"from your own computer: ssh -CN -L {port}:127.0.0.1:{port} root@<host> -p <ssh port> "
            f"(AutoDL: the console's SSH command), then open http://127.0.0.1:{port}/docs and http://127.0.0.1:{port}/")


class BackgroundServer:
    """``python -m conch serve`` in a child process on a free local port (notebooks, make run, tests).

        with BackgroundServer("outputs/magic_conch_merged") as server:
            print(server.url)          # http://127.0.0.1:<port>

    ``start()`` waits until ``/health`` answers; ``stop()`` sends SIGTERM, so uvicorn finishes the
    requests in flight (within the server's ``--shutdown_drain_s``), runs the shutdown, and
    returns the exit code. One log file and one exit hook per server, however often it restarts.
    """

    def __init__(self, model: str | Path, *args: str, port: int | None = None, env: dict | None = None,
                 startup_timeout_s: float = 180, log: str | Path | None = None):
        self.model, self.args, self.env = str(model), [str(a) for a in args], env or {}
        self.port, self.timeout, self.log = port, startup_timeout_s, log
        self.process = None
        self._log_file = None
        self._hooked = False

    @property
    def url(self) -> str:
        if self.port is None:
            raise ConchError("the server has no port yet; call start() first (or use it in a `with` block).")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "BackgroundServer":
        if self.process is not None and self.process.poll() is None:
            return self  # already running
        if self.port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "conch", "serve", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self._close_log()
        if self.log:
            Path(self.log).parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(cmd, stdout=self._log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        if not self._hooked:  # a notebook kernel that dies must not leave the server behind
            atexit.register(self.stop)
            self._hooked = True
        status = wait_until_healthy(self.url, self.process, self.timeout)
        if status == "exited":
            self._close_log()
            detail = Path(self.log).read_text()[-2000:] if self.log else "(pass log=... to keep its output)"
            raise ConchError(f"the server exited with code {self.process.returncode} before it was ready: "
                             f"{detail.strip().splitlines()[-1] if detail.strip() else 'no output'}")
        if status == "timeout":
            self.stop()
            raise ConchError(f"the server did not answer /health within {self.timeout:g} s.")
        print(f"server ready at {self.url}; on a remote machine, {tunnel_command(self.port)}", flush=True)
        return self

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_log()
        if self._hooked:
            atexit.unregister(self.stop)
            self._hooked = False
        return self.process.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
