"""What every console page shares: the client, plain error messages, status badges, formatting."""
from __future__ import annotations

import math
import os
import re
from datetime import datetime, timezone
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


SESSION_TOKEN = "modelplane_token"          # the token this browser session signed in with
SESSION_SIGNED_OUT = "modelplane_signed_out"  # on loopback: set aside the machine's token
SESSION_IDENTITY = "modelplane_identity"      # whoami of the token in use, refreshed every run

#: The roles, each with everything the one before it may do (control/identity.py).
ROLES = ("viewer", "runner", "deployer", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}


def exposed() -> bool:
    """Whether this console is reachable beyond loopback (Streamlit's `server.address`; unset
    means every interface). Then it must not act with the machine's token for whoever opens
    it: each browser session signs in with its own token."""
    address = st.get_option("server.address") or ""
    return not is_loopback_host(address)


def client() -> ControlClient:
    """The client for this run: the token this browser session signed in with, if any; else,
    on loopback and unless the session signed out, MODELPLANE_URL with the machine's token
    (MODELPLANE_TOKEN or the state dir's file); beyond loopback, no token at all."""
    url = os.environ.get("MODELPLANE_URL") or DEFAULT_URL
    token = st.session_state.get(SESSION_TOKEN)
    if token:
        return ControlClient(url, token)
    if exposed() or st.session_state.get(SESSION_SIGNED_OUT):
        return ControlClient(url, None)
    return ControlClient.from_env()


def signed_in_here() -> bool:
    """Whether this browser session gave its own token (not the machine's)."""
    return bool(st.session_state.get(SESSION_TOKEN))


def _local_client() -> ControlClient:
    return ControlClient.from_env()


def sign_in(client: ControlClient) -> bool:
    """Ask for a token when this session has none to act with: beyond loopback until one is
    given, on loopback after "Sign in as someone else" or "Sign out". False: stop the page."""
    if client.token:
        return True
    if not exposed() and not st.session_state.get(SESSION_SIGNED_OUT):
        return True   # loopback without any token: the pages say where to find one
    st.title("Sign in to modelplane")
    if exposed():
        st.write("This console is reachable from other machines, so it acts only with a token you give it.")
    st.write("Sign in with your token (from your admin, or `modelplane token create`). What you may do "
             "here follows its role: a viewer sees, a runner also scores, a deployer also rolls out and "
             "rolls back, an admin also manages tokens. The service's own token (`MODELPLANE_TOKEN`, or "
             "the `token` file in its state directory, printed once by `modelplane up`) signs in as admin.")
    with st.form("sign-in"):
        given = st.text_input("Your token", type="password", key="sign-in-token")
        submitted = st.form_submit_button("Sign in")
    if submitted and given.strip():
        trial = ControlClient(client.url, given.strip())
        try:
            me = trial.whoami()
        except Unauthorized:
            st.error("**Token rejected** by the control service (wrong, or revoked): check it and try again.",
                     icon=":material/lock:")
        except ControlError as err:
            show_error(err)
        else:
            st.session_state[SESSION_TOKEN] = given.strip()
            st.session_state.pop(SESSION_SIGNED_OUT, None)
            st.session_state[SESSION_IDENTITY] = me
            st.rerun()
    if not exposed() and _local_client().token:
        if st.button("Continue as the local admin", key="sign-in-local",
                     help="Use this machine's token (MODELPLANE_TOKEN, or the state directory's token file)"):
            st.session_state.pop(SESSION_SIGNED_OUT, None)
            st.rerun()
    return False


def sign_out() -> None:
    """Forget this session's token; on loopback also set the machine's token aside."""
    st.session_state.pop(SESSION_TOKEN, None)
    st.session_state.pop(SESSION_IDENTITY, None)
    st.session_state[SESSION_SIGNED_OUT] = True


def identify(client: ControlClient) -> Optional[dict]:
    """Who the token in use is (`GET /api/whoami`), kept for the pages of this run; None when
    there is no token, it is refused, or the service cannot say (then the service alone decides)."""
    me: Optional[dict] = None
    if client.token:
        try:
            me = client.whoami()
        except ControlError:
            me = None
    if isinstance(me, dict) and me.get("role") in RANK:
        st.session_state[SESSION_IDENTITY] = me
    else:
        st.session_state.pop(SESSION_IDENTITY, None)
        me = None
    return me


def me() -> Optional[dict]:
    """The identity the console acts as (set by `identify` at the top of each run), or None."""
    return st.session_state.get(SESSION_IDENTITY)


def identity_text(identity: dict) -> str:
    """`alice — deployer, models of risk-team`."""
    text = f"{identity.get('name')} — {identity.get('role')}"
    if identity.get("owner"):
        text += f", models of {identity['owner']}"
    return text


def sidebar(client: ControlClient, identity: Optional[dict]) -> None:
    """Where the control service is, who this session is signed in as, and how to change it."""
    st.caption(f"Control service: `{client.url}`")
    if identity:
        st.markdown(f"Signed in as **{identity_text(identity)}**")
        if not signed_in_here() and not exposed():
            st.caption("with this machine's token")
    elif client.token:
        st.caption("Token: not accepted")
    else:
        st.caption("Token: not set")
    if signed_in_here() or exposed():
        if st.button("Sign out", key="sign-out", icon=":material/logout:"):
            sign_out()
            st.rerun()
    elif st.button("Sign in as someone else" if client.token else "Sign in", key="sign-in-other",
                   icon=":material/login:", help="Sign in with your own token (from your admin, or "
                                                  "`modelplane token create`)"):
        sign_out()
        st.rerun()


def model_owner(detail: Optional[dict]) -> Optional[str]:
    if not isinstance(detail, dict):
        return None
    return detail.get("owner") or (detail.get("manifest") or {}).get("owner") or None


def _public(detail: Optional[dict]) -> bool:
    return isinstance(detail, dict) and (detail.get("manifest") or {}).get("visibility") == "public"


def refusal(need: str, detail: Optional[dict] = None, *, predict: bool = False) -> Optional[str]:
    """Why the signed-in identity may not make a call that needs the role `need` (on the model
    `detail`, if any), or None when it may — and when the identity is unknown, the service decides.
    `predict`: a public model takes predictions from any token."""
    identity = me()
    if not identity:
        return None
    if predict and _public(detail):
        return None
    role = identity.get("role")
    if RANK.get(role, -1) < RANK[need]:
        return f"Needs the {need} role or above; you are {identity.get('name')} ({role})."
    limit = identity.get("owner")
    if detail is not None and limit and (model_owner(detail) or "") != limit:
        return (f"{identity.get('name')} may change only models of {limit}; {detail.get('name', 'this model')} "
                f"belongs to {model_owner(detail) or 'no owner'}.")
    return None


def allowed(need: str, detail: Optional[dict] = None, *, what: str = "", predict: bool = False,
            where=st) -> bool:
    """Whether to show a control that needs `need`; when not, one line says why instead."""
    why = refusal(need, detail, predict=predict)
    if why is None:
        return True
    where.caption(f":material/lock: {what + ': ' if what else ''}{why}")
    return False


def show_error(err: ControlError) -> None:
    """One plain message for a failed call: what happened and what to do about it."""
    if isinstance(err, Unreachable):
        st.error(
            f"**Control service unreachable** at `{err.url}`. Start it with `modelplane up` "
            "(or `modelplane serve`), or set `MODELPLANE_URL` to where it runs.",
            icon=":material/power_off:",
        )
    elif isinstance(err, Unauthorized) and err.forbidden:
        st.error(f"**Not allowed** (HTTP 403): {err.message}. Ask your admin for a token of a role that may, "
                 "or sign in as someone who may.", icon=":material/block:")
    elif isinstance(err, Unauthorized):
        st.error(
            f"**Not authorised** by the control service at `{err.url}` (HTTP {err.status}: "
            f"{err.message}). Sign in again with your token, or check `MODELPLANE_TOKEN`: it must be one "
            "the service knows.",
            icon=":material/lock:",
        )
    else:
        status = f"HTTP {err.status}: " if err.status else ""
        st.error(f"{status}{err.message}", icon=":material/warning:")


def connection_banner(client: ControlClient, identity: Optional[dict] = None) -> None:
    """Say up front, on every page, when the token is refused (every API call needs it).
    Unreachable is left to the page, which says so where its content would be."""
    if identity:
        return   # whoami answered: the token is good
    try:
        accepted = client.check_token()
    except Unreachable:
        return
    if accepted:
        return
    if client.token and signed_in_here():
        st.error(
            f"**Token rejected** by the control service at `{client.url}` (HTTP 401): it was revoked, "
            "or the service no longer knows it. Sign out and sign in with your token (from your admin, "
            "or `modelplane token create`).",
            icon=":material/lock:",
        )
    elif client.token:
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


def styled(frame, status_column: str = "Status", *, counts: Optional[list[str]] = None, precision: int = 1):
    """A table with coloured status cells, counts written `3,000,000` as everywhere else, and a
    dash, not `None`, where there is no value yet. `counts`: the integer columns (by default, every
    integer column and every float one whose values are whole)."""
    formats = {}
    for column in frame.columns:
        values = frame[column].dropna()
        kind = frame[column].dtype.kind
        whole = kind in "iu" or (kind == "f" and len(values) and (values % 1 == 0).all())
        if (counts is None and whole) or (counts is not None and column in counts):
            formats[column] = fmt_count
    style = frame.style.format(formats, na_rep="—", precision=precision)
    if status_column in frame.columns:
        style = style.map(style_status, subset=[status_column])
    return style


def fmt_count(value: Any) -> str:
    """A count as every page writes it: `3,000,000`, a dash when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


#: How every page writes a time: this machine's local time, 24-hour clock.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
CLOCK_FORMAT = "%H:%M:%S"
AXIS_TIME_FORMAT = "%H:%M"   # time axes of charts: 24-hour, as the footers


def parse_time(value: Any) -> Optional[datetime]:
    """An ISO 8601 text (or epoch seconds) as an aware datetime; None when absent or unreadable."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), timezone.utc)
    try:
        t = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def fmt_time(value: Any, *, clock: bool = False) -> str:
    """`2026-12-07 21:03:04` (or `21:03:04` with `clock`), local time; a dash when there is none.
    Never the raw ISO text: an unreadable one shows as `?`."""
    if value is None or value == "":
        return "—"
    t = parse_time(value)
    if t is None:
        return "?"
    return t.astimezone().strftime(CLOCK_FORMAT if clock else TIME_FORMAT)


# -- crash output -----------------------------------------------------------------------------

#: A loopback URL or host:port (a replica's or its model's port): meaningless to the reader,
#: replaced before crash output is shown (the local runtime already scrubs what it records).
_LOOPBACK = re.compile(r"(?:https?://)?(?:127(?:\.\d{1,3}){3}|localhost|\[::1\]|0\.0\.0\.0)(?::\d{1,5})?"
                       r"(?:/[^\s,;)'\"]*)?", re.IGNORECASE)
INTERNAL = "(internal address)"
#: where a crash's summary ends and the model's own output begins, as the runtimes write them
_OUTPUT_MARKERS = ("Adapter output (tail):", "its log ends with:")


def scrub(text: Any) -> str:
    return _LOOPBACK.sub(INTERNAL, str(text or ""))


_REPEATED = "; its last stderr lines:\n"   # the adapter's closing repetition of its model's stderr


def _once(text: str) -> str:
    """The model's stderr once: the adapter's closing repetition of lines the output already has, dropped."""
    at = text.rfind(_REPEATED)
    if at < 0:
        return text
    before, repeated = text[:at], text[at + len(_REPEATED):]
    lines = [line for line in repeated.splitlines() if line.strip()]
    return before + "." if lines and all(line in before for line in lines) else text


def crash_parts(text: Any) -> tuple[str, str]:
    """(summary, output) of a failure: the runtime's sentence, then the model's output, each
    once, with no internal address."""
    text = _once(scrub(text).strip())
    for marker in _OUTPUT_MARKERS:
        at = text.find(marker)
        if at >= 0:
            return text[:at].strip().rstrip(".:;") + ".", text[at + len(marker):].strip()
    first, _, rest = text.partition("\n")
    return first.strip(), rest.strip()


def first_line(text: Any, limit: int = 140) -> str:
    """A failure in one short line (tables and cards): the summary, cut at `limit` characters."""
    summary = crash_parts(text)[0]
    return summary if len(summary) <= limit else summary[:limit - 1].rstrip() + "…"


OUTPUT_HEIGHT = 240   # pixels: a crash's output scrolls inside its block, never stretches the page


def show_failure(text: Any, *, title: str, where=st, tone: str = "error") -> None:
    """A failure: one sentence in a banner, then the model's output once, in a monospace block of
    bounded height (its lines kept)."""
    summary, output = crash_parts(text)
    box = where.error if tone == "error" else where.warning
    box(f"**{title}** {summary}", icon=":material/error:" if tone == "error" else ":material/warning:")
    if output:
        where.caption("Its output (the end):")
        lines = output.count("\n") + 1
        where.code(output, language=None, height=min(OUTPUT_HEIGHT, 24 * lines + 40))


def version_broken(v: dict) -> bool:
    """A version that does not work: it failed its deploy check, or crashed until it stopped."""
    return bool(v.get("failed") or v.get("crashed"))


def last_working(versions: list[dict], candidates: list[str], prefer: Optional[str] = None) -> int:
    """Which of `candidates` to pre-select: `prefer` when it works, else the newest that works
    (`versions` newest first, as the API lists them); 0 when none does."""
    broken = {v.get("version") for v in versions if version_broken(v)}
    if prefer in candidates and prefer not in broken:
        return candidates.index(prefer)
    order = [v.get("version") for v in versions]
    working = [c for c in candidates if c not in broken]
    if not working:
        return 0
    working.sort(key=lambda c: order.index(c) if c in order else len(order))
    return candidates.index(working[0])


# -- charts -----------------------------------------------------------------------------------

#: Two series' colours (Okabe-Ito blue and vermillion): told apart with any colour vision.
PAIR = ("#0072B2", "#D55E00")


def overlaid_histograms(frame, *, series: str, order: list, y: str, y_title: str, title: str, tooltip: list,
                        height: int = 240):
    """Two histograms on one axis (`frame`: one row per bin with `from`, `to`, `y` and the
    `series` it belongs to): the first filled, the second an outline on top. Nothing is drawn
    translucent over something else, so the colours stay the two of the legend; the legend sits
    under the chart."""
    import altair as alt

    scale = alt.Scale(domain=list(order), range=list(PAIR))
    legend = alt.Legend(orient="bottom", title=None)
    base = alt.Chart(frame).encode(
        x=alt.X("from:Q", title="score"), x2="to:Q",
        y=alt.Y(f"{y}:Q", title=y_title, stack=None), y2=alt.datum(0),
        color=alt.Color(f"{series}:N", scale=scale, legend=legend),
        tooltip=tooltip)
    first = base.transform_filter(alt.datum[series] == order[0]).mark_rect(opacity=0.55)
    second = base.transform_filter(alt.datum[series] == order[1]).mark_rect(
        filled=False, strokeWidth=2, opacity=1)
    return alt.layer(first, second, title=title).properties(height=height)


def time_chart(frame, *, value: str, title: str, bar: bool = False, height: int = 220):
    """A time series per model (`frame`: time, model, `value`): a 24-hour time axis (as the
    footers), the legend under the chart."""
    import altair as alt

    mark = alt.Chart(frame).mark_bar() if bar else alt.Chart(frame).mark_line(point=False)
    return mark.encode(
        x=alt.X("time:T", title=None, axis=alt.Axis(format=AXIS_TIME_FORMAT, labelOverlap=True)),
        y=alt.Y(f"{value}:Q", title=None),
        color=alt.Color("model:N", legend=alt.Legend(orient="bottom", title=None)),
        tooltip=[alt.Tooltip("time:T", format=TIME_FORMAT), "model", alt.Tooltip(f"{value}:Q", format=",.2f")],
    ).properties(title=title, height=height)


#: what a table shows where it has no value (Streamlit's own default is the word "None")
NO_VALUE = "—"


def table(data, **kwargs):
    """`st.dataframe` as every page draws it: a dash, never "None", where a value is missing."""
    kwargs.setdefault("placeholder", NO_VALUE)
    return st.dataframe(data, **kwargs)


def fmt_ms(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):.1f} ms"


def fmt_int(value: Any) -> str:
    return fmt_count(value)


def metrics_of(detail: dict) -> dict:
    metrics = detail.get("metrics") if isinstance(detail, dict) else None
    return metrics if isinstance(metrics, dict) else {}


def features_of(detail: dict) -> list[dict]:
    manifest = detail.get("manifest") or {}
    return list(manifest.get("features") or [])
