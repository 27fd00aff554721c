"""Settings precedence: keyword arguments (CLI flags) over MODELPLANE_* environment over defaults."""
from pathlib import Path

from control.settings import Settings


def test_defaults(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("MODELPLANE_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.runtime, s.host, s.port, s.console_port) == ("local", "127.0.0.1", 8080, 8501)
    assert s.state_dir == Path(".modelplane") and s.models_dir == Path("models")
    assert s.control_url == "http://127.0.0.1:8080"
    assert s.bucket_name == "modelplane"


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("MODELPLANE_PORT", "9090")
    monkeypatch.setenv("MODELPLANE_RUNTIME", "knative")
    monkeypatch.setenv("MODELPLANE_URL", "http://plane.example:80/")
    s = Settings()
    assert s.port == 9090 and s.runtime == "knative"
    assert s.control_url == "http://plane.example:80"


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("MODELPLANE_PORT", "9090")
    assert Settings(port=7070).port == 7070


def test_wildcard_bind_is_reached_on_loopback(monkeypatch):
    monkeypatch.delenv("MODELPLANE_URL", raising=False)
    assert Settings(host="0.0.0.0", port=81).control_url == "http://127.0.0.1:81"
