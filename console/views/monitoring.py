"""Score monitoring on a model's page: for each version, its reference and recent score
distributions overlaid, PSI and KS against the reference, and a warning when it has drifted
(what `GET /api/models/{name}` answers under `monitoring`)."""
from __future__ import annotations

from typing import Optional

import altair as alt
import pandas as pd
import streamlit as st

from console import common

SERIES = ("reference", "recent")
COLORS = common.PAIR


def histogram_frame(v: dict) -> pd.DataFrame:
    """One row per bin of each series: its range and its density (share of the series' scores per
    unit of score), so series on different bins (a batch job's own) still overlay fairly."""
    out = []
    for series in SERIES:
        h = (v.get(series) or {}).get("histogram") or {}
        edges, counts = h.get("edges") or [], h.get("counts") or []
        total = sum(counts)
        if not total or len(edges) != len(counts) + 1:
            continue
        for lo, hi, n in zip(edges, edges[1:], counts):
            width = (hi - lo) or 1.0
            out.append({"series": series, "from": lo, "to": hi, "scores": n, "share": n / total,
                        "density": n / total / width})
    return pd.DataFrame(out, columns=["series", "from", "to", "scores", "share", "density"])


def chart(frame: pd.DataFrame, title: str) -> alt.Chart:
    # reference filled, recent outlined: colours that do not blend (common.overlaid_histograms)
    return common.overlaid_histograms(frame, series="series", order=list(SERIES), y="density", y_title="density",
                                      title=title, tooltip=["series", alt.Tooltip("from:Q", format=".4g"),
                                                            alt.Tooltip("to:Q", format=".4g"),
                                                            alt.Tooltip("scores:Q", format=","),
                                                            alt.Tooltip("share:Q", format=".1%")])


def _version_key(version: str) -> tuple:
    core = version.split("+")[0].split("-")[0].split(".")
    return tuple(int(p) if p.isdigit() else 0 for p in core), version


def _fmt(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.3f}"


def version_panel(name: str, version: str, v: dict, *, live: bool) -> None:
    drift = v.get("drift") or {}
    psi, ks, threshold = drift.get("psi"), drift.get("ks"), v.get("threshold")
    label = f"**{version}**" + (" (live)" if live else "")
    st.markdown(label)
    if v.get("drifted"):
        st.warning(f"**{name} {version} has drifted:** its recent scores have a PSI of {_fmt(psi)} against its "
                   f"reference, above the manifest's threshold of {threshold} (monitoring.drift_threshold). "
                   "Check its input data before trusting its scores.", icon=":material/warning:")
    cols = st.columns(4)
    cols[0].metric("PSI", _fmt(psi), help=f"population stability index; flagged above {threshold}")
    cols[1].metric("KS", _fmt(ks), help="largest distance between the two distribution functions (0–1)")
    ref, recent = v.get("reference") or {}, v.get("recent") or {}
    # scores are rows (one per row scored), not requests: the page's "Requests" counts those
    cols[2].metric("Reference scores (rows)", common.fmt_int(ref.get("count")))
    cols[3].metric("Recent scores (rows)", common.fmt_int(recent.get("count")))
    what = f"reference: {ref.get('source', '?')}"
    if recent.get("job"):
        what += f" · recent: job {recent['job']}"
    if drift.get("reason"):
        what += f" · {drift['reason']}"
    st.caption(what)
    frame = histogram_frame(v)
    if frame.empty:
        st.caption("No scores to chart yet.")
    else:
        st.altair_chart(chart(frame, f"{version}: reference vs recent scores"), width="stretch")


def section(name: Optional[str], detail: Optional[dict] = None) -> None:
    """The page's monitoring section for model `name` (its detail fetched unless given)."""
    if not name:
        return
    if detail is None:
        detail = common.client().model(name)
    versions = ((detail.get("monitoring") or {}).get("versions")) or {}
    st.subheader("Score monitoring")
    if not versions:
        st.caption("No scores observed yet: the first scores each version gives become its reference, "
                   "and later ones are compared with them.")
        return
    live = detail.get("version")
    # drifted first, then the live version, then the newest
    order = sorted(versions, key=_version_key, reverse=True)
    order.sort(key=lambda k: (not versions[k].get("drifted"), k != live))
    for version in order:
        with st.container(border=True):
            version_panel(name, version, versions[version], live=version == live)
