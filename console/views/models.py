"""Models: every model at a glance — status (scaled to zero and starting visible), traffic, latency."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from console import common
from console.client import NotFound

DETAIL_LIMIT = 50  # beyond this many models, skip the per-model metrics calls
CARD_LIMIT = 24  # beyond this many, the table alone (cards stop being "at a glance")
REFRESH_SECONDS = 5


def _details(client, models: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for m in models[:DETAIL_LIMIT]:
        if isinstance(m.get("metrics"), dict):
            out[m["name"]] = m
            continue
        try:
            out[m["name"]] = client.model(m["name"])
        except NotFound:  # removed between the two calls
            continue
    return out


def _card(m: dict, metrics: dict) -> None:
    with st.container(border=True):
        st.markdown(f"**{m['name']}**")
        common.status_badge(m.get("status"), long=False)
        st.caption(f"{m.get('kind', '?')} · {m.get('language', '?')} · v{m.get('version') or '—'}")
        cols = st.columns(3)
        cols[0].metric("Replicas", m.get("replicas", metrics.get("replicas", 0)))
        cols[1].metric("Requests", common.fmt_int(metrics.get("requests")))
        cols[2].metric("p50", common.fmt_ms(metrics.get("p50_ms")))
        if m.get("error"):
            st.caption(f":red[{m['error']}]")
        st.page_link(common.PAGE_MODEL, label=f"Open {m['name']}", icon=":material/open_in_new:",
                     query_params={"model": m["name"]})


def overview() -> None:
    client = common.client()
    models = client.models()
    if not models:
        st.info("No models are registered yet. Put a model folder under `models/` and run "
                "`modelplane deploy models/<name>` (or restart `modelplane up`).")
        return
    details = _details(client, models)

    counts = {s: sum(1 for m in models if m.get("status") == s) for s in common.MODEL_STATUS}
    cols = st.columns(5)
    cols[0].metric("Models", len(models))
    cols[1].metric("Ready", counts["ready"])
    cols[2].metric("Idle (scaled to zero)", counts["idle"])
    cols[3].metric("Starting", counts["starting"])
    cols[4].metric("Failed", counts["failed"])

    rows = []
    for m in models:
        metrics = common.metrics_of(details.get(m["name"], {}))
        rows.append({
            "Model": m["name"],
            "Status": common.status_label(m.get("status")),
            "Kind": m.get("kind"),
            "Language": m.get("language"),
            "Live version": m.get("version"),
            "Replicas": m.get("replicas", 0),
            "Requests": metrics.get("requests"),
            "p50 (ms)": metrics.get("p50_ms"),
            "Endpoint": m.get("endpoint") or "",
            "Error": m.get("error") or "",
        })
    table = pd.DataFrame(rows)
    st.dataframe(
        common.styled(table),
        hide_index=True,
        column_config={"p50 (ms)": st.column_config.NumberColumn(format="%.1f"),
                       "Requests": st.column_config.NumberColumn(format="%d")},
    )
    if len(models) > DETAIL_LIMIT:
        st.caption(f"Requests and latency shown for the first {DETAIL_LIMIT} models; "
                   "open a model for its own numbers.")

    if len(models) <= CARD_LIMIT:
        grid = st.columns(min(4, len(models)))
        for i, m in enumerate(models):
            with grid[i % len(grid)]:
                _card(m, common.metrics_of(details.get(m["name"], {})))
    st.caption(f"Updated {pd.Timestamp.now().strftime('%H:%M:%S')}"
               + (f" · refreshes every {REFRESH_SECONDS} s" if st.session_state.get("auto_refresh", True) else ""))


st.title("Models")
st.caption("Every model on the plane. Idle = scaled to zero: the next request starts a replica.")
auto = st.sidebar.toggle("Auto-refresh", value=True, key="auto_refresh")
st.fragment(run_every=REFRESH_SECONDS if auto else None)(common.guarded(overview))()
