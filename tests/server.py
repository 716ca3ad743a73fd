"""Start a real `python -m conch serve` (uvicorn) on 127.0.0.1 for a test, and stop it after."""

import os
from contextlib import contextmanager

from conch.serve import BackgroundServer


@contextmanager
def running_server(model, *args: str, env: dict | None = None):
    env = {"CONCH_THREADS": os.environ.get("CONCH_THREADS", "1"), **(env or {})}
    with BackgroundServer(model, *args, env=env) as server:
        yield server.url
