"""A comparison of two versions' scores on the same rows (control/stats.py `compare`), drawn
the same way wherever one shows: a comparison's report (Compare page) and the shadow copies of a
rollout (the model page's Traffic tab)."""
from __future__ import annotations

from typing import Optional

import altair as alt
import pandas as pd
import streamlit as st

from console import common


def psi_reading(psi: Optional[float]) -> str:
    if psi is None:
        return "—"
    return "stable" if psi < 0.1 else "moderate" if psi < 0.25 else "major"


def histogram_frame(report: dict) -> pd.DataFrame:
    """Both versions' histograms on the report's common edges, one row per (version, bin)."""
    hist = report["histogram"]
    edges = hist["edges"]
    rows = []
    for label in (report["labels"]["a"], report["labels"]["b"]):
        for i, count in enumerate(hist.get(label) or []):
            rows.append({"version": label, "from": edges[i], "to": edges[i + 1], "rows": count})
    return pd.DataFrame(rows, columns=["version", "from", "to", "rows"])


def distribution_chart(report: dict) -> alt.Chart:
    """A's histogram filled, B's drawn as an outline over it: two colours that never mix (a
    translucent fill over another makes a third, muddy one), from a colour-blind-safe pair; the
    legend under the chart, so it is never cut off at the right."""
    a, b = report["labels"]["a"], report["labels"]["b"]
    return common.overlaid_histograms(histogram_frame(report), series="version", order=[a, b], y="rows",
                                      y_title="rows", title=f"Scores of {a} and {b} on the same rows",
                                      tooltip=["version", alt.Tooltip("from:Q", format=".4g"),
                                               alt.Tooltip("to:Q", format=".4g"), alt.Tooltip("rows:Q", format=",")])


def quantiles_frame(report: dict) -> pd.DataFrame:
    a, b = report["labels"]["a"], report["labels"]["b"]
    qa, qb = report["quantiles"][a], report["quantiles"][b]
    rows = []
    for key in qa:
        if key == "count":
            continue
        va, vb = qa.get(key), qb.get(key)
        rows.append({"Quantile": key, a: va, b: vb,
                     "Difference": None if va is None or vb is None else vb - va})
    return pd.DataFrame(rows)


def show_report(c: dict) -> None:
    report = c["report"]
    a, b = report["labels"]["a"], report["labels"]["b"]
    drift, diff = report["drift"], report["difference"]
    cols = st.columns(5)
    cols[0].metric("Rows compared", common.fmt_int(report["rows"]))
    cols[1].metric("Identical rows", common.fmt_int(diff["identical_rows"]))
    cols[2].metric("PSI", f"{drift['psi']:.4f}" if drift["psi"] is not None else "—",
                   help="Population stability index of B against A: < 0.1 stable, < 0.25 moderate, else major")
    cols[3].metric("KS", f"{drift['ks']:.4f}" if drift["ks"] is not None else "—",
                   help="Largest distance between the two empirical distribution functions (0 to 1)")
    flips = report.get("flips")
    cols[4].metric(f"Flips at {report['threshold']:g}" if flips is not None else "Flips",
                   common.fmt_int(flips["count"]) if flips is not None else "—")
    st.caption(f"Drift of {b} against {a}: **{psi_reading(drift['psi'])}**. Mean difference ({b} − {a}) "
               f"{diff['mean']:.4g}, mean |difference| {diff['mean_abs']:.4g}, largest {diff['max_abs']:.4g}.")
    st.altair_chart(distribution_chart(report), width="stretch")
    left, right = st.columns(2)
    with left:
        st.markdown("**Quantiles**")
        common.table(quantiles_frame(report), hide_index=True, width="stretch")
    with right:
        st.markdown("**Largest differences**")
        common.table(pd.DataFrame([{"Row": x["row"], a: x[a], b: x[b], "Difference": x["difference"]}
                                   for x in report.get("largest") or []],
                                  columns=["Row", a, b, "Difference"]),
                     hide_index=True, width="stretch")
    if flips is not None:
        st.markdown(f"**Decisions that flip at {report['threshold']:g}** — {flips['count']:,} of "
                    f"{report['rows']:,} rows ({flips['to_positive']:,} up to ≥ threshold, "
                    f"{flips['to_negative']:,} down)")
        if flips["rows"]:
            common.table(pd.DataFrame([{"Row": f["row"], a: f[a], b: f[b]} for f in flips["rows"]],
                                      columns=["Row", a, b]), hide_index=True, width="stretch")
