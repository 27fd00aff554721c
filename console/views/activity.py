"""Activity: requests per second, latency percentiles, replicas and cold starts over time, per
model; the audit trail of every change (who, what, when, allowed or not) and its chain check; and,
for an admin, the named tokens."""
from __future__ import annotations

from datetime import date, datetime, time, timezone
from typing import Any, Optional

import pandas as pd
import streamlit as st

from console import common
from console.client import ControlError, NotFound

AUDIT_ACTIONS = ("deploy", "rollout", "promote", "rollback", "remove", "reference", "compare", "job.run",
                 "dataset.upload", "token.create", "token.revoke")
AUDIT_OUTCOMES = ("ok", "denied", "failed")
ANY = "any"

REFRESH_SECONDS = 10
DEFAULT_INTERVAL = 10.0  # seconds per history point (ARCHITECTURE.md)


def _time(values: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(values):
        return pd.to_datetime(values, unit="s", utc=True)
    return pd.to_datetime(values, utc=True, format="mixed")


def history_frame(name: str, detail: dict) -> pd.DataFrame:
    """One model's metrics.history as rows (time, model, rps, p50, p95, replicas, cold starts)."""
    history = common.metrics_of(detail).get("history") or []
    if not history:
        return pd.DataFrame()
    frame = pd.DataFrame(history)
    if "t" not in frame:
        return pd.DataFrame()
    # local wall-clock time, as the footers and every other time on the pages
    frame["time"] = _time(frame["t"]).dt.tz_convert(datetime.now().astimezone().tzinfo).dt.tz_localize(None)
    frame = frame.sort_values("time")
    step = frame["time"].diff().dt.total_seconds().fillna(DEFAULT_INTERVAL).clip(lower=1.0)
    frame["requests/s"] = frame.get("requests", 0) / step
    frame["model"] = name
    return frame


def _chart(frames: pd.DataFrame, column: str, title: str, *, bar: bool = False) -> None:
    st.markdown(f"**{title}**")
    if column not in frames:
        st.caption("no data")
        return
    data = frames[["time", "model", column]].dropna()
    st.altair_chart(common.time_chart(data, value=column, title="", bar=bar), width="stretch")


def activity(names: list[str]) -> None:
    client = common.client()
    frames, totals = [], []
    for name in names:
        try:
            detail = client.model(name)
        except NotFound:
            continue
        m = common.metrics_of(detail)
        totals.append({
            "Model": name,
            "Status": common.status_label(detail.get("status")),
            "Requests": m.get("requests"),
            "Errors": m.get("errors"),
            "p50 (ms)": m.get("p50_ms"),
            "p95 (ms)": m.get("p95_ms"),
            "Replicas": detail.get("replicas", m.get("replicas")),
            "Cold starts": m.get("cold_starts"),
        })
        frame = history_frame(name, detail)
        if not frame.empty:
            frames.append(frame)
    if totals:
        table = pd.DataFrame(totals)
        for column in ("Requests", "Errors", "Replicas", "Cold starts", "p50 (ms)", "p95 (ms)"):
            table[column] = pd.to_numeric(table[column], errors="coerce")
        common.table(common.styled(table, counts=["Requests", "Errors", "Replicas", "Cold starts"]), hide_index=True)
    if not frames:
        st.info("No activity recorded yet: the charts fill in as models serve requests "
                "(one point per 10 s, last hour).", icon=":material/monitoring:")
        return
    data = pd.concat(frames, ignore_index=True)
    left, right = st.columns(2)
    with left:
        _chart(data, "requests/s", "Requests per second")
        _chart(data, "p50_ms", "p50 latency (ms)")
        _chart(data, "cold_starts", "Cold starts", bar=True)
    with right:
        _chart(data, "replicas", "Replicas")
        _chart(data, "p95_ms", "p95 latency (ms)")
        _chart(data, "errors", "Errors", bar=True)
    st.caption(f"Updated {pd.Timestamp.now().strftime(common.CLOCK_FORMAT)} · refreshes every {REFRESH_SECONDS} s"
               " · times are this machine's, 24-hour")


def serving() -> None:
    names = common.client().model_names(include=None)
    if not names:
        st.info("No models are registered yet.")
        return
    chosen = st.multiselect("Models", names, default=names[:8], key="activity-models")
    if not chosen:
        st.caption("Pick at least one model.")
        return
    st.fragment(run_every=REFRESH_SECONDS)(common.guarded(lambda: activity(chosen)))()


# -- audit trail ------------------------------------------------------------------------------

def local_time(text: Optional[str]) -> str:
    """An ISO 8601 time as this machine's local time, `2026-12-07 21:03:04`; the text itself if unreadable."""
    if not text:
        return ""
    return common.fmt_time(text)


def since_utc(day: Optional[date]) -> Optional[str]:
    """The start of a local day as the UTC time the audit filter takes."""
    if day is None:
        return None
    start = datetime.combine(day, time.min).astimezone()   # local midnight
    return start.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _what(r: dict) -> str:
    parts = []
    if r.get("model"):
        parts.append(str(r["model"]) + (f" {r['version']}" if r.get("version") else ""))
    elif r.get("version"):
        parts.append(str(r["version"]))
    if r.get("target"):
        parts.append(f"→ {r['target']}")
    return " ".join(parts)


def _detail(value: Any) -> str:
    if not value:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def audit_frame(records: list[dict]) -> pd.DataFrame:
    """The audit records as the table shows them, newest first."""
    columns = ["When", "Who", "Role", "Action", "What", "Outcome", "Status", "Request", "Detail"]
    return pd.DataFrame([{
        "When": local_time(r.get("at")),
        "Who": r.get("who", ""),
        "Role": (r.get("role") or "") + (f" ({r['owner']})" if r.get("owner") else ""),
        "Action": r.get("action", ""),
        "What": _what(r),
        "Outcome": r.get("outcome", ""),
        "Status": r.get("status") if r.get("status") is not None else "—",
        "Request": r.get("request_id") or "",
        "Detail": _detail(r.get("detail")),
    } for r in records], columns=columns)


def _outcome_cell(value: Any) -> str:
    return {"ok": "color: #1b5e20", "denied": "background-color: #ffe8cc; color: #8a4b00",
            "failed": "background-color: #ffe3e3; color: #a61e1e"}.get(str(value), "")


def chain_check() -> None:
    check = common.client().audit_verify()
    if check.get("ok"):
        st.success(f"Audit chain intact: {check.get('records', 0):,} records.", icon=":material/verified:")
    else:
        st.warning(f"**Audit chain broken:** {check.get('problem') or 'no reason given'} "
                   f"({check.get('records', 0):,} records checked).", icon=":material/gpp_bad:")


def audit_trail() -> None:
    st.caption("Every change made through the control service, and every one refused: newest first. "
               "Times are this machine's local time.")
    cols = st.columns([2, 2, 2, 2, 2, 1])
    who = cols[0].text_input("Who", key="audit-who", placeholder="any name").strip()
    action = cols[1].selectbox("Action", (ANY,) + AUDIT_ACTIONS, key="audit-action")
    model = cols[2].text_input("Model", key="audit-model", placeholder="any model").strip()
    outcome = cols[3].selectbox("Outcome", (ANY,) + AUDIT_OUTCOMES, key="audit-outcome")
    since = cols[4].date_input("Since (day)", value=None, key="audit-since", format="YYYY-MM-DD")
    limit = cols[5].number_input("At most", min_value=1, max_value=5000, value=200, step=50, key="audit-limit")
    try:
        records = common.client().audit(who=who or None, action=None if action == ANY else action,
                                        model=model or None, outcome=None if outcome == ANY else outcome,
                                        since=since_utc(since), limit=int(limit))
    except ControlError as err:
        common.show_error(err)
        records = None
    if records is not None:
        if not records:
            st.info("No audit records match." if (who or model or since or action != ANY or outcome != ANY)
                    else "No changes recorded yet.", icon=":material/history:")
        else:
            frame = audit_frame(records)
            frame["Status"] = frame["Status"].astype(str)   # an HTTP status, not a count: no separator
            common.table(frame.style.format(na_rep="—").map(_outcome_cell, subset=["Outcome"]), hide_index=True,
                         column_config={"Request": st.column_config.TextColumn(help="The request id: "
                                                                               "X-Request-Id of the call")})
            st.caption(f"{len(records):,} record(s)" + (f", the newest {int(limit):,}" if len(records) >= limit else ""))
    common.guarded(chain_check)()


# -- tokens (admin) ---------------------------------------------------------------------------

def tokens() -> None:
    st.caption("Named tokens, each with a role (and optionally limited to one owner's models). A token is "
               "shown once, when it is created; the service keeps only its hash.")
    created = st.session_state.pop("token-created", None)
    if created:
        st.success(f"Token for **{created['name']}** ({created['role']}"
                   + (f", models of {created['owner']}" if created.get("owner") else "")
                   + "): copy it now — it is not shown again.", icon=":material/key:")
        st.code(created["token"], language=None)
        st.caption("Use the copy button at the code box's corner; hand it over privately.")
    notice = st.session_state.pop("token-notice", None)
    if notice:
        st.success(notice, icon=":material/check_circle:")
    listed = common.client().tokens()
    if listed:
        common.table(pd.DataFrame([{
            "Name": t.get("name"), "Role": t.get("role"), "Owner": t.get("owner") or "",
            "Created": local_time(t.get("created_at")), "By": t.get("created_by") or "",
        } for t in listed]), hide_index=True)
    else:
        st.caption("No named tokens yet: only the service's own token (admin) exists.")
    left, right = st.columns(2)
    with left, st.form("token-create", clear_on_submit=True):
        st.markdown("**Create a token**")
        name = st.text_input("Name (who holds it)", key="token-name", placeholder="alice")
        role = st.selectbox("Role", common.ROLES, key="token-role")
        owner = st.text_input("Only models of owner (optional)", key="token-owner",
                              placeholder="any owner")
        if st.form_submit_button("Create token", icon=":material/add:"):
            if not name.strip():
                st.error("Give the token a name.", icon=":material/block:")
            else:
                try:
                    made = common.client().create_token(name.strip(), role=role, owner=owner.strip() or None)
                except ControlError as err:
                    common.show_error(err)
                else:
                    st.session_state["token-created"] = made
                    st.rerun()
    with right, st.container(border=True):
        st.markdown("**Revoke a token**")
        names = [t.get("name") for t in listed]
        if not names:
            st.caption("Nothing to revoke.")
            return
        pick = st.selectbox("Token", names, key="token-revoke-pick")
        if st.button(f"Revoke {pick}", key="token-revoke", icon=":material/key_off:",
                     help="Refused from now on, by every replica"):
            try:
                common.client().revoke_token(pick)
            except ControlError as err:
                common.show_error(err)
            else:
                st.session_state["token-notice"] = f"{pick}'s token is revoked."
                st.rerun()


def page() -> None:
    st.title("Activity")
    admin = common.refusal("admin") is None and common.me() is not None
    tabs = st.tabs(["Serving", "Audit trail"] + (["Tokens"] if admin else []))
    with tabs[0]:
        common.guarded(serving)()
    with tabs[1]:
        common.guarded(audit_trail)()
    if admin:
        with tabs[2]:
            common.guarded(tokens)()


page()
