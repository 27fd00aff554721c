"""Serving the control service with waitress (never Flask's dev server): in a thread for `up`
and the tests (start -> bound port -> stop), or in the foreground for `modelplane serve`.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

from waitress.server import create_server

from control.app import create_app
from control.runtime.base import Runtime
from control.settings import Settings

log = logging.getLogger(__name__)


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
        self._server = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._server.effective_port

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
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
        try:
            self._server = create_server(
                self.app, host=self.settings.host, port=self.settings.port, threads=self.settings.threads,
                ident="modelplane", clear_untrusted_proxy_headers=True, channel_timeout=300,
                # waitress spools a body to disk before the app sees it: nothing past the
                # largest route cap is accepted at all (each route checks its own first)
                max_request_body_size=max(self.settings.max_model_upload, self.settings.max_dataset_upload),
                connection_limit=max(1000, self.settings.threads * 4))
        except OSError as e:
            self.plane.close()
            raise OSError(e.errno, f"cannot listen on {self.settings.host}:{self.settings.port}: {e.strerror}"
                                   " (another modelplane? set MODELPLANE_PORT or --port)") from None
        except BaseException:
            self.plane.close()
            raise
        self._thread = threading.Thread(target=self._server.run, name="modelplane-control", daemon=True)
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
        server, self._server = self._server, None
        if server is not None:
            # Close every channel and the listener from inside the loop's own thread, so the
            # loop sees an empty map and returns; then let the worker threads finish.
            def close_all():
                for channel in list(server._map.values()):
                    try:
                        channel.close()
                    except OSError:
                        pass

            try:
                server.trigger.pull_trigger(close_all)
            except OSError:
                close_all()
            if self._thread is not None:
                self._thread.join(timeout)
                if self._thread.is_alive():  # the trigger did not run: close from here
                    close_all()
                    self._thread.join(timeout)
            server.task_dispatcher.shutdown(timeout=timeout)
            self._thread = None
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
