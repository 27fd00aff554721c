"""What every console page shares: the client, plain error messages, status badges, formatting."""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import streamlit as st

from console.client import DEFAULT_URL, ControlClient, ControlError, Unauthorized, Unreachable, is_loopback_host

# status -> (badge colour, Material icon, table symbol, what it means). Material icons ship
# with Streamlit, so badges look the same in every browser; tables get plain symbols plus a
# coloured cell, which need no emoji font.
MODEL_STATUS = {
    "ready": ("green", ":material/check_circle:", "●", "serving"),
    "idle": ("gray", ":material/bedtime:", "○", "scaled to zero: the next request starts a replica"),
    "starting": ("orange", ":material/hourglass_top:", "◐", "a replica is starting"),
    "failed": ("red", ":material/error:", "✕", "not serving"),
}
JOB_STATUS = {
    "queued": ("gray", ":material/schedule:", "○", "waiting for a worker"),
    "running": ("blue", ":material/sync:", "◐", "running"),
    "succeeded": ("green", ":material/check_circle:", "●", "scores published"),
    "failed": ("red", ":material/error:", "✕", "failed"),
}
# Background colours for status cells in tables (Styler), matching the badges.
STATUS_CELL = {
    "ready": "background-color: #d3f9d8; color: #1b5e20",
    "idle": "background-color: #e9ecef; color: #495057",
    "starting": "background-color: #ffe8cc; color: #8a4b00",
    "failed": "background-color: #ffe3e3; color: #a61e1e",
    "queued": "background-color: #e9ecef; color: #495057",
    "running": "background-color: #d0ebff; color: #1c4f80",
    "succeeded": "background-color: #d3f9d8; color: #1b5e20",
}

PAGE_MODELS = "views/models.py"
PAGE_MODEL = "views/model.py"
PAGE_JOBS = "views/jobs.py"
PAGE_ACTIVITY = "views/activity.py"


SESSION_TOKEN = "modelplane_token"


def exposed() -> bool:
    """Whether this console is reachable beyond loopback (Streamlit's `server.address`; unset
    means every interface). Then it must not act with the machine's token for whoever opens
    it: each browser session signs in with the token itself."""
    address = st.get_option("server.address") or ""
    return not is_loopback_host(address)


def client() -> ControlClient:
    """The client for this run: on loopback, MODELPLANE_URL with the machine's token
    (MODELPLANE_TOKEN or the state dir's file); beyond loopback, the token this browser
    session signed in with, and no other."""
    if exposed():
        return ControlClient(os.environ.get("MODELPLANE_URL") or DEFAULT_URL,
                             st.session_state.get(SESSION_TOKEN))
    return ControlClient.from_env()


def sign_in(client: ControlClient) -> bool:
    """Beyond loopback: ask for the token until the service accepts one. False: stop the page."""
    if not exposed():
        return True
    if client.token:
        return True
    st.title("Sign in to modelplane")
    st.write("This console is reachable from other machines, so it acts only with a token you give it. "
             "The token is `MODELPLANE_TOKEN` of the control service, or the `token` file in its state "
             "directory (printed once by `modelplane up`).")
    with st.form("sign-in"):
        given = st.text_input("Token", type="password", key="sign-in-token")
        submitted = st.form_submit_button("Sign in")
    if submitted and given.strip():
        trial = ControlClient(client.url, given.strip())
        try:
            accepted = trial.check_token()
        except Unreachable as err:
            show_error(err)
            return False
        if accepted:
            st.session_state[SESSION_TOKEN] = given.strip()
            st.rerun()
        st.error("**Token rejected** by the control service: check it and try again.", icon=":material/lock:")
    return False


def show_error(err: ControlError) -> None:
    """One plain message for a failed call: what happened and what to do about it."""
    if isinstance(err, Unreachable):
        st.error(
            f"**Control service unreachable** at `{err.url}`. Start it with `modelplane up` "
            "(or `modelplane serve`), or set `MODELPLANE_URL` to where it runs.",
            icon=":material/power_off:",
        )
    elif isinstance(err, Unauthorized):
        st.error(
            f"**Not authorised** by the control service at `{err.url}` (HTTP {err.status}: "
            f"{err.message}). Check `MODELPLANE_TOKEN`: it must match the service's token.",
            icon=":material/lock:",
        )
    else:
        status = f"HTTP {err.status}: " if err.status else ""
        st.error(f"{status}{err.message}", icon=":material/warning:")


def connection_banner(client: ControlClient) -> None:
    """Say up front, on every page, when the token is refused (every API call needs it).
    Unreachable is left to the page, which says so where its content would be."""
    try:
        accepted = client.check_token()
    except Unreachable:
        return
    if accepted:
        return
    if client.token:
        st.error(
            f"**Token rejected** by the control service at `{client.url}` (HTTP 401): check "
            "`MODELPLANE_TOKEN` — it must match the service's token (or the `token` file in its "
            "state directory, printed once by `modelplane up`).",
            icon=":material/lock:",
        )
    else:
        st.error(
            f"**No token.** The control service at `{client.url}` needs one for every call: set "
            "`MODELPLANE_TOKEN`, or run the console where `modelplane up` keeps its state directory "
            "(`.modelplane/token`).",
            icon=":material/lock:",
        )


def guarded(render: Callable[[], None]) -> Callable[[], None]:
    """Wrap a page (or fragment) body so API failures become messages, never stack traces."""

    def run() -> None:
        try:
            render()
        except ControlError as err:
            show_error(err)

    run.__name__ = getattr(render, "__name__", "page")
    return run


_UNKNOWN = ("violet", ":material/help:", "?", "unknown")


def status_badge(status: Optional[str], *, where=st, long: bool = True) -> None:
    colour, icon, _, meaning = MODEL_STATUS.get(status or "", _UNKNOWN)
    label = "idle · scaled to zero" if status == "idle" and long else (status or "unknown")
    where.badge(label, icon=icon, color=colour, help=meaning)


def job_badge(status: Optional[str], *, where=st) -> None:
    colour, icon, _, meaning = JOB_STATUS.get(status or "", _UNKNOWN)
    where.badge(status or "unknown", icon=icon, color=colour, help=meaning)


def status_label(status: Optional[str], table: dict = MODEL_STATUS) -> str:
    """`● ready`: the symbol keeps a cue where colour is lost (exports, colour blindness)."""
    symbol = table.get(status or "", _UNKNOWN)[2]
    return f"{symbol} {status or 'unknown'}"


def style_status(value: Any) -> str:
    text = str(value).split(" ")[-1] if value is not None else ""
    return STATUS_CELL.get(text, "")


def styled(frame, status_column: str = "Status"):
    """A table with coloured status cells and a dash, not `None`, where there is no number yet."""
    formats = {}
    for column in frame.columns:
        values = frame[column].dropna()
        if frame[column].dtype.kind == "f" and len(values) and (values % 1 == 0).all():
            formats[column] = "{:,.0f}"  # a count that pandas made float because of a gap
    style = frame.style.format(formats, na_rep="—", precision=1)
    if status_column in frame.columns:
        style = style.map(style_status, subset=[status_column])
    return style


def fmt_ms(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):.1f} ms"


def fmt_int(value: Any) -> str:
    return "—" if value is None else f"{int(value):,}"


def metrics_of(detail: dict) -> dict:
    metrics = detail.get("metrics") if isinstance(detail, dict) else None
    return metrics if isinstance(metrics, dict) else {}


def features_of(detail: dict) -> list[dict]:
    manifest = detail.get("manifest") or {}
    return list(manifest.get("features") or [])
