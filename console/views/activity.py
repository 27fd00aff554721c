"""Activity: requests per second, latency percentiles, replicas and cold starts over time, per model."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from console import common
from console.client import NotFound

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
    frame["time"] = _time(frame["t"]).dt.tz_convert(None)
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
    wide = frames.pivot_table(index="time", columns="model", values=column, aggfunc="last")
    if bar:
        st.bar_chart(wide, height=220)
    else:
        st.line_chart(wide, height=220)


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
        st.dataframe(common.styled(pd.DataFrame(totals)), hide_index=True,
                     column_config={"p50 (ms)": st.column_config.NumberColumn(format="%.1f"),
                                    "p95 (ms)": st.column_config.NumberColumn(format="%.1f")})
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
    st.caption(f"Updated {pd.Timestamp.now().strftime('%H:%M:%S')} · refreshes every {REFRESH_SECONDS} s")


def page() -> None:
    st.title("Activity")
    names = common.client().model_names(include=None)
    if not names:
        st.info("No models are registered yet.")
        return
    chosen = st.multiselect("Models", names, default=names[:8], key="activity-models")
    if not chosen:
        st.caption("Pick at least one model.")
        return
    st.fragment(run_every=REFRESH_SECONDS)(common.guarded(lambda: activity(chosen)))()


common.guarded(page)()
