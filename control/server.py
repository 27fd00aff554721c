"""Serving the control service: the asyncio front door (control/frontdoor.py) in front of the
Flask API, on one address. In a thread for `up` and the tests (start -> bound port -> stop),
or in the foreground for `modelplane serve`.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from pathlib import Path
from typing import Optional

from aiohttp import web

from control import statelock

from control.app import create_app
from control.frontdoor import FrontDoor
from control.runtime.base import Runtime
from control.settings import Settings
from control.uploads import clean_stale_uploads

log = logging.getLogger(__name__)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); OSError names the address."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or "127.0.0.1", port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}"
                               " (another modelplane? set MODELPLANE_PORT or --port)") from None
    sock.setblocking(False)
    return sock


async def _shut(runner: web.ServerRunner) -> None:
    """Stop listening, let requests in flight finish (up to the runner's shutdown timeout),
    then cancel whatever is left: a connection a client kept open mid-request included."""
    await runner.cleanup()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5.0)


class ControlServer:
    """The control service on `settings.host:settings.port` (port 0 binds a free one).

    With `watch=True` a bucket watcher posting to this server's `/events` runs beside it.
    `stop()` stops the watcher, the server, and the runtime if the app built it.
    """

    def __init__(self, settings: Optional[Settings] = None, *, runtime: Optional[Runtime] = None,
                 watch: bool = False, register: bool = True):
        self.settings = settings or Settings()
        self._runtime = runtime
        self._watch = watch
        self._register = register
        self.app = None
        self.watcher = None
        self._port = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.ServerRunner] = None
        self._door: Optional[FrontDoor] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def plane(self):
        return self.app.extensions["modelplane"]

    @property
    def runtime(self) -> Runtime:
        return self.plane.runtime

    def start(self) -> "ControlServer":
        """Build the app (registering ./models), bind, serve in a thread; returns once bound."""
        self.app = create_app(self.settings, runtime=self._runtime, register=self._register)
        # what a killed service left mid-deploy: all of it when this process owns the state dir
        state = Path(self.settings.state_dir)
        clean_stale_uploads(state / "uploads", everything=statelock.held(state))
        loop = None
        try:
            sock = _listen(self.settings.host, self.settings.port)
            self._port = sock.getsockname()[1]
            self._door = FrontDoor(self.app, self.plane, threads=self.settings.threads)
            loop = _new_loop()
            loop.set_default_executor(self._door.pool)

            async def serve() -> web.ServerRunner:
                runner = web.ServerRunner(self._door.server(), handle_signals=False, shutdown_timeout=5.0)
                await runner.setup()
                await web.SockSite(runner, sock).start()
                return runner

            self._runner = loop.run_until_complete(serve())
        except BaseException:
            if loop is not None:
                loop.close()
            self.plane.close()
            raise
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="modelplane-control", daemon=True)
        self._thread.start()
        log.info("control service on %s", self.url)
        if self._watch:
            from control.watcher import from_settings

            # the token the service enforces (the state dir's when none was given)
            settings = self.settings.model_copy(update={"token": self.plane.token})
            self.watcher = from_settings(settings, sink=f"{self.url}/events").start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        loop, self._loop = self._loop, None
        if loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(_shut(self._runner), loop).result(timeout + 5.0)
            except Exception:  # noqa: BLE001 — stopping goes on whatever a handler did
                log.exception("stopping the control service's server")
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout)
                self._thread = None
            if not loop.is_running():
                loop.close()
            self._door.pool.shutdown(wait=False, cancel_futures=True)
        if self.app is not None:
            self.plane.close()

    def __enter__(self) -> "ControlServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for_signal() -> int:
    """Block until SIGINT or SIGTERM; return the signal number."""
    got = threading.Event()
    received = {"sig": 0}

    def handler(signum, frame):
        received["sig"] = signum
        got.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not got.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return received["sig"]


def serve(settings: Optional[Settings] = None, *, watch: bool = False) -> None:
    """Run the control service in the foreground until SIGINT/SIGTERM."""
    server = ControlServer(settings, watch=watch).start()
    print(f"control service on {server.url}", flush=True)
    if server.plane.token_created:
        from control.auth import token_path

        print(f"token {server.plane.token} (new; stored in {token_path(server.settings.state_dir)})", flush=True)
    try:
        wait_for_signal()
    finally:
        server.stop()
