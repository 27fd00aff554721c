"""Score monitoring on a model's page: for each version, its reference and recent score
distributions overlaid, PSI and KS against the reference, and a warning when it has drifted;
its inputs' drift per feature (the drifted features named, a table of every feature's PSI and a
chart of reference vs recent shares per feature); what a reference still needs
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
    if ref and not ref.get("complete") and ref.get("needed"):
        what += f" · the reference holds {common.fmt_int(ref.get('count'))} of {common.fmt_int(ref['needed'])} scores"
    if drift.get("reason"):
        what += f" · {drift['reason']}"
    st.caption(what)
    frame = histogram_frame(v)
    if frame.empty:
        st.caption("No scores to chart yet.")
    else:
        st.altair_chart(chart(frame, f"{version}: reference vs recent scores"), width="stretch")
    inputs_panel(name, version, v)


def features_frame(inputs: dict) -> pd.DataFrame:
    """One row per feature: its kind, PSI, whether it drifted, and its reference and recent middles
    (a number's median, a category's most common value and its share)."""
    out = []
    for feature, d in sorted((inputs.get("features") or {}).items(), key=lambda kv: (not kv[1].get("drifted"), kv[0])):
        if d.get("type") == "number":
            ref, cur = _fmt(d["reference"].get("p50")), _fmt(d["recent"].get("p50"))
        else:
            ref, cur = _top(d["reference"].get("shares")), _top(d["recent"].get("shares"))
        out.append({"feature": feature, "kind": d.get("type"), "PSI": _fmt(d.get("psi")),
                    "drifted": "yes" if d.get("drifted") else "no", "reference": ref, "recent": cur})
    return pd.DataFrame(out, columns=["feature", "kind", "PSI", "drifted", "reference", "recent"])


def _top(shares: Optional[dict]) -> str:
    if not shares:
        return "—"
    value, share = max(shares.items(), key=lambda kv: kv[1])
    return f"{value} {share:.0%}"


def feature_chart_frame(d: dict) -> pd.DataFrame:
    """One feature's reference and recent shares: a number's over its reference deciles (the bins
    its PSI is taken over), a category's per value."""
    out = []
    if d.get("type") == "number":
        bins = d.get("bins") or {}
        edges = bins.get("edges") or []
        labels = ([f"≤ {edges[0]:.4g}"] + [f"{a:.4g} – {b:.4g}" for a, b in zip(edges, edges[1:])]
                  + [f"> {edges[-1]:.4g}"]) if edges else ["all"]
        for series in SERIES:
            for i, (label, share) in enumerate(zip(labels, bins.get(series) or [])):
                out.append({"series": series, "bin": label, "order": i, "share": share or 0.0})
    else:
        values = sorted(set((d["reference"].get("shares") or {})) | set((d["recent"].get("shares") or {})))
        for series in SERIES:
            shares = d[series].get("shares") or {}
            for i, value in enumerate(values):
                out.append({"series": series, "bin": value, "order": i, "share": shares.get(value, 0.0)})
    return pd.DataFrame(out, columns=["series", "bin", "order", "share"])


def feature_chart(frame: pd.DataFrame, title: str) -> alt.Chart:
    return alt.Chart(frame, title=title).mark_bar().encode(
        x=alt.X("bin:N", sort=alt.SortField("order"), title=None),
        xOffset=alt.XOffset("series:N", sort=list(SERIES)),
        y=alt.Y("share:Q", title="share", axis=alt.Axis(format="%")),
        color=alt.Color("series:N", scale=alt.Scale(domain=list(SERIES), range=list(COLORS)), title=None),
        tooltip=["series", "bin", alt.Tooltip("share:Q", format=".1%")],
    ).properties(height=200)


def inputs_panel(name: str, version: str, v: dict) -> None:
    """The version's input drift: the drifted features named, a table of every feature, a chart each."""
    inputs = v.get("inputs") or {}
    features = inputs.get("features") or {}
    if not features:
        if inputs.get("reason") and v.get("reference", {}).get("complete"):
            st.caption(f"Inputs: {inputs['reason']}.")
        return
    drifted = inputs.get("drifted") or []
    if drifted:
        named = ", ".join(f"{f} (PSI {_fmt(features[f].get('psi'))})" for f in drifted)
        st.warning(f"**{name} {version}: its inputs have drifted** in {named}, above the threshold of "
                   f"{v.get('threshold')} (monitoring.drift_threshold).", icon=":material/warning:")
    st.markdown("Input drift per feature")
    common.table(features_frame(inputs), hide_index=True, width="stretch")
    with st.expander("Reference vs recent, per feature", expanded=bool(drifted)):
        for feature in drifted + sorted(f for f in features if f not in drifted):
            frame = feature_chart_frame(features[feature])
            if not frame.empty:
                st.altair_chart(feature_chart(frame, f"{feature}: reference vs recent"), width="stretch")


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
