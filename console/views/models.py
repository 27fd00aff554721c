"""Models: the catalog — searched, filtered by owner and labels and paged by the control service;
status (scaled to zero and starting visible), drift, traffic, latency at a glance."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from console import common
from console.client import ControlError, NotFound

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
        # one line of figures, not three metrics: a card is a quarter of the page, too narrow for them
        st.markdown(f"{common.fmt_count(m.get('replicas', metrics.get('replicas', 0)))} replica(s) · "
                    f"{common.fmt_count(metrics.get('requests'))} requests · p50 {common.fmt_ms(metrics.get('p50_ms'))}")
        if m.get("drifted"):
            st.caption(f":orange[drifted: {', '.join(m['drifted'])}]")
        if m.get("error"):
            # one short line: the model page shows the whole output, once, in a code block
            tone = "red" if m.get("status") == "failed" else "orange"
            st.caption(f":{tone}[{common.first_line(m['error'], 90)}]")
        st.page_link(common.PAGE_MODEL, label=f"Open {m['name']}", icon=":material/open_in_new:",
                     query_params={"model": m["name"]})


PAGE_SIZES = (25, 50, 100, 200)
#: column widths (px) that fit the page's main column at a laptop's width: no sideways scroll
TABLE_WIDTHS = {"Model": 135, "Status": 80, "Owner": 135, "Labels": 165, "Kind": 115, "Version": 60,
                "Requests": 75, "p50 (ms)": 65, "Notes": 130}


def _selectors(text: str) -> list[str]:
    """`customer=acme, team!=x  tier` -> the label selectors the API takes, one each."""
    return [part for part in text.replace(",", " ").split() if part]


def _filters() -> tuple[list[str], str, str, int]:
    """The search box, owner and label selectors and the page size; a change starts at page 1."""
    cols = st.columns([3, 2, 3, 1])
    q = cols[0].text_input("Search", key="models_q", placeholder="name, description, owner or label value",
                           max_chars=200)
    owner = cols[1].text_input("Owner", key="models_owner", placeholder="exact, e.g. fundraising-analytics")
    labels = cols[2].text_input("Labels", key="models_labels", placeholder="customer=acme team!=ops tier",
                                help="Label selectors, all must match: `key=value`, `key!=value`, or `key` "
                                     "(has the label); separate them with spaces or commas.")
    limit = cols[3].selectbox("Per page", PAGE_SIZES, index=1, key="models_limit")
    selectors = _selectors(labels)
    signature = (q.strip(), owner.strip(), tuple(selectors), limit)
    if st.session_state.get("models_signature") != signature:
        st.session_state["models_signature"] = signature
        st.session_state["models_pages"] = []   # the `after` of each page before this one
    return selectors, owner.strip(), q.strip(), limit


def _next(after: str) -> None:
    st.session_state.setdefault("models_pages", []).append(after)


def _previous() -> None:
    pages = st.session_state.setdefault("models_pages", [])
    if pages:
        pages.pop()


def _drift_text(m: dict) -> str:
    drifted = m.get("drifted") or []
    return f"drifted ({', '.join(drifted)})" if drifted else ""


def _number(value) -> float:
    """A metric as a float, NaN when unknown: the table shows a dash, never `None`."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def overview() -> None:
    client = common.client()
    selectors, owner, q, limit = _filters()
    filtered = bool(selectors or owner or q)
    pages = st.session_state.setdefault("models_pages", [])
    try:
        page = client.models_page(label=selectors, owner=owner or None, q=q or None, limit=limit,
                                  after=pages[-1] if pages else None)
    except ControlError as err:
        if err.status == 400:
            st.warning(f"The filter is not understood: {err.message}")
            return
        raise
    models, total = page["models"], page["total"]
    if not models and pages:        # the list shrank under this page: back to the first
        pages.clear()
        page = client.models_page(label=selectors, owner=owner or None, q=q or None, limit=limit)
        models, total = page["models"], page["total"]
    if not models:
        if filtered:
            st.info("No model matches these filters.")
        else:
            st.info("No models are registered yet. Put a model folder under `models/` and run "
                    "`modelplane deploy models/<name>` (or restart `modelplane up`).")
        return
    details = _details(client, models)

    counts = {s: sum(1 for m in models if m.get("status") == s) for s in common.MODEL_STATUS}
    cols = st.columns(6)
    cols[0].metric("Matching" if filtered else "Models", f"{total:,}")
    cols[1].metric("Ready", counts["ready"])
    cols[2].metric("Idle", counts["idle"], help="scaled to zero: the next request starts a replica")
    cols[3].metric("Starting", counts["starting"])
    cols[4].metric("Failed", counts["failed"])
    cols[5].metric("Drifted", sum(1 for m in models if m.get("drifted")))

    rows = []
    for m in models:
        metrics = common.metrics_of(details.get(m["name"], {}))
        labels = m.get("labels") or {}
        # what fits the page's width without a sideways scroll: the endpoint and replicas are on
        # the model's page and its card; drift and an error share one short "Notes" cell
        notes = [_drift_text(m)] if m.get("drifted") else []
        if m.get("error"):
            notes.append(common.first_line(m.get("error"), 60))
        rows.append({
            "Model": m["name"],
            "Status": common.status_label(m.get("status")),
            "Owner": m.get("owner") or "",
            "Labels": ", ".join(f"{k}={v}" for k, v in sorted(labels.items())),
            "Kind": f"{m.get('kind') or '?'} · {m.get('language') or '?'}",
            "Version": m.get("version") or "—",
            "Requests": _number(metrics.get("requests")),
            "p50 (ms)": _number(metrics.get("p50_ms")),
            "Notes": " · ".join(notes),
        })
    table = pd.DataFrame(rows)
    common.table(common.styled(table, counts=["Requests"]), hide_index=True,
                 column_config={column: st.column_config.Column(width=width) for column, width in TABLE_WIDTHS.items()})
    first = len(pages) * limit + 1
    nav = st.columns([1, 1, 6])
    nav[0].button("← Previous", key="models_prev", disabled=not pages, on_click=_previous)
    nav[1].button("Next →", key="models_next", disabled=page["next"] is None, on_click=_next,
                  args=(page["next"],))
    nav[2].caption(f"Models {first:,}–{first + len(models) - 1:,} of {total:,}"
                   + (" matching" if filtered else "") + (" · status counts are this page's" if total > len(models)
                                                          else ""))
    if any(m.get("drifted") for m in models):
        st.warning("Drifted: " + ", ".join(f"**{m['name']}** ({', '.join(m['drifted'])})" for m in models
                                           if m.get("drifted"))
                   + " — recent scores moved away from the version's reference; open the model for its chart.")
    if len(models) > DETAIL_LIMIT:
        st.caption(f"Requests and latency shown for the first {DETAIL_LIMIT} models of the page; "
                   "open a model for its own numbers.")

    if len(models) <= CARD_LIMIT and not pages and total <= CARD_LIMIT:
        grid = st.columns(min(4, len(models)))
        for i, m in enumerate(models):
            with grid[i % len(grid)]:
                _card(m, common.metrics_of(details.get(m["name"], {})))
    st.caption(f"Updated {pd.Timestamp.now().strftime(common.CLOCK_FORMAT)}"
               + (f" · refreshes every {REFRESH_SECONDS} s" if st.session_state.get("auto_refresh", True) else ""))


st.title("Models")
st.caption("Every model on the plane. Idle = scaled to zero: the next request starts a replica.")
auto = st.sidebar.toggle("Auto-refresh", value=True, key="auto_refresh")
st.fragment(run_every=REFRESH_SECONDS if auto else None)(common.guarded(overview))()
