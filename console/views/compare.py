"""Compare: score one dataset with two versions of a model and see how they differ — both
distributions overlaid, quantiles side by side, PSI and KS, the decisions that flip at a threshold
and the rows that moved most. Past comparisons are listed below."""
from __future__ import annotations

from typing import Optional

import pandas as pd
import streamlit as st

from console import common
from console.comparison import show_report
from console.client import ControlError

REFRESH_SECONDS = 1.0


def status_text(status: Optional[str]) -> str:
    """`● succeeded`: plain symbols the default fonts draw (no emoji font is needed)."""
    return common.status_label(status, common.JOB_STATUS)


def show_comparison(comparison_id: str, *, was_running: bool = False) -> None:
    c = common.client().comparison(comparison_id)
    if was_running and c["status"] in ("succeeded", "failed"):
        st.rerun()   # the whole page: the report shows, the past list has it, the polling stops
    label = f"{c['model']}: {c.get('a')} vs {c.get('b')}" if c.get("kind") == "comparison" else \
        f"{c['model']} {c.get('version')}: reference"
    st.subheader(label)
    st.caption(f"`{c['id']}` · dataset `{c['dataset']}` · {status_text(c['status'])} · "
               f"created {common.fmt_time(c.get('created_at'))}")
    progress = c.get("progress") or {}
    if c["status"] in ("queued", "running"):
        total, done = progress.get("total"), progress.get("rows")
        share = min(1.0, done / total) if total and done is not None else 0.05
        st.progress(share, text=f"{progress.get('stage', c['status'])}"
                                + (f" — {done:,}/{total:,} rows" if total else ""))
        for v, job in sorted((progress.get("jobs") or {}).items()):
            st.caption(f"{v}: job `{job.get('job')}` {job.get('status')}")
        return
    if c["status"] == "failed":
        # a failed comparison is the comparison's (and the version's), never the model's health
        common.show_failure(c.get("error") or "no reason given", title="The comparison failed:")
        if c.get("problems"):
            problems = pd.DataFrame(c["problems"]).rename(columns=str.capitalize)
            common.table(common.styled(problems), hide_index=True,
                         column_config={"Row": st.column_config.NumberColumn(help="1 = the first data row")})
        if c.get("features"):
            st.json(c["features"], expanded=False)
        return
    if c.get("report"):
        show_report(c)
    elif c.get("reference"):
        st.success(f"{c['reference']['count']:,} scores are now the reference of {c['model']} {c.get('version')}.")


def past(model: str) -> list[str]:
    """The model's comparisons as a table; their ids, newest first."""
    items = common.client().comparisons(model)
    if not items:
        st.caption("No comparisons of this model yet.")
        return []
    frame = pd.DataFrame([{
        "Id": c["id"], "Kind": c.get("kind"), "A": c.get("a") or c.get("version"), "B": c.get("b") or "—",
        "Status": status_text(c["status"]), "Rows": (c.get("summary") or {}).get("rows"),
        "PSI": (c.get("summary") or {}).get("psi"), "KS": (c.get("summary") or {}).get("ks"),
        "Flips": (c.get("summary") or {}).get("flips"), "Created": common.fmt_time(c.get("created_at")),
        "Dataset": c.get("dataset")} for c in items],
        columns=["Id", "Kind", "A", "B", "Status", "Rows", "PSI", "KS", "Flips", "Created", "Dataset"])
    for column in ("Rows", "Flips"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("PSI", "KS"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    common.table(common.styled(frame, counts=["Rows", "Flips"], precision=4), hide_index=True,
                 column_config={"Dataset": st.column_config.TextColumn(width="medium")})
    return [c["id"] for c in items]


def run_form(model: str, versions: list[str], live: Optional[str], infos: Optional[list[dict]] = None) -> None:
    """`versions` newest first; `infos` the API's versions (which failed or crashed): each
    version's default is the newest that worked, never a broken one."""
    infos = infos or []
    with st.container(border=True):
        cols = st.columns(2)
        a_default = versions.index(live) if live in versions else common.last_working(infos, versions)
        a = cols[0].selectbox("Version A (baseline)", versions, index=a_default, key=f"cmp-a-{model}")
        others = [v for v in versions if v != a] or versions
        b = cols[1].selectbox("Version B", others, index=common.last_working(infos, others), key=f"cmp-b-{model}",
                              format_func=lambda v: v + _broken_note(infos, v))
        source = st.radio("Dataset", ["Upload a CSV", "A gs:// URI"], horizontal=True, key=f"cmp-src-{model}")
        upload, uri = None, ""
        if source == "Upload a CSV":
            upload = st.file_uploader("Rows to score (CSV with the feature columns)", type=["csv"],
                                      key=f"cmp-file-{model}")
        else:
            uri = st.text_input("Dataset URI", placeholder="gs://bucket/path/rows.csv", key=f"cmp-uri-{model}")
        cols = st.columns(2)
        threshold = cols[0].number_input("Decision threshold (rows whose decision flips)", value=None,
                                         placeholder="none", key=f"cmp-threshold-{model}", format="%g")
        top = cols[1].number_input("Largest differences to list", min_value=0, max_value=1000, value=20,
                                   key=f"cmp-top-{model}")
        ready = a != b and (upload is not None or uri.strip().startswith("gs://"))
        if st.button("Compare", type="primary", icon=":material/compare_arrows:", disabled=not ready,
                     key=f"cmp-run-{model}"):
            try:
                dataset = uri.strip()
                if upload is not None:
                    with st.spinner(f"Uploading {upload.name}…"):
                        dataset = common.client().upload_comparison_dataset(model, data=upload.getvalue())["uri"]
                c = common.client().compare(model, a=a, b=b, dataset=dataset, threshold=threshold, top=int(top))
            except ControlError as err:
                common.show_error(err)
            else:
                st.session_state["comparison"] = c["id"]
                st.query_params["comparison"] = c["id"]


def page() -> None:
    st.title("Compare versions")
    st.caption("Score the same rows with two versions of a model: how far apart their scores are, whether "
               "the distribution moved, and which decisions change.")
    client = common.client()
    names = client.model_names(include=st.session_state.get("model") or st.query_params.get("model"))
    if not names:
        st.info("No models are registered yet.")
        return
    model = st.selectbox("Model", names, key="model", bind="query-params")
    detail = client.model(model)
    versions = [v["version"] for v in detail.get("versions") or []]
    if len(versions) < 2:
        st.info(f"{model} has one version ({', '.join(versions) or 'none'}): deploy another to compare them.")
    elif common.allowed("deployer", detail, what="Starting a comparison"):
        run_form(model, versions, detail.get("version"), detail.get("versions") or [])
    chosen = st.query_params.get("comparison") or st.session_state.get("comparison")
    if chosen:
        running = _running(chosen)
        st.fragment(run_every=REFRESH_SECONDS if running else None)(
            common.guarded(lambda: show_comparison(chosen, was_running=running)))()
    st.markdown("**Past comparisons**")
    ids = past(model)
    if ids:
        pick = st.selectbox("Open a past comparison", ["—"] + ids, key=f"cmp-open-{model}")
        if pick != "—" and pick != chosen:
            st.query_params["comparison"] = pick
            st.rerun()


def _broken_note(infos: list[dict], version: str) -> str:
    v = next((x for x in infos if x.get("version") == version), {})
    if v.get("failed"):
        return " (failed its deploy check)"
    if v.get("crashed"):
        return " (crashed: not restarted)"
    return ""


def _running(comparison_id: str) -> bool:
    try:
        return common.client().comparison(comparison_id)["status"] in ("queued", "running")
    except ControlError:
        return False


common.guarded(page)()
