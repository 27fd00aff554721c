"""One model: its feature schema, a form generated from the features, CSV scoring, versions and rollback."""
from __future__ import annotations

import hashlib
import io
import math
from typing import Any, Optional

import numpy as np
import pandas as pd
import streamlit as st

from console import common
from console.views import monitoring
from console.client import ControlError, Invalid, parse_size
from console.comparison import show_report

DEFAULT_MAX_ROWS = 10_000


# -- schema and form ----------------------------------------------------------------------

def schema_table(features: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{
        "Feature": f["name"],
        "Type": f.get("type", ""),
        "Required": "required" if f.get("required", True) else "optional",
        "Allowed values": ", ".join(map(_show, f["allowed"])) if f.get("allowed") else "any",
        "Description": f.get("description") or "",
    } for f in features])


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def feature_input(f: dict, key: str) -> Any:
    """One widget per feature: its type picks the widget; optional ones may stay empty."""
    name, typ = f["name"], f.get("type", "string")
    required = f.get("required", True)
    label = f"{name} *" if required else f"{name} (optional)"
    help_ = " · ".join(x for x in (f.get("description"), f"{typ}, {'required' if required else 'optional: leave empty to omit'}") if x)
    empty = "not given"
    if f.get("allowed"):
        return st.selectbox(label, f["allowed"], index=0 if required else None, key=key,
                            format_func=_show, placeholder=empty, help=help_)
    if typ == "boolean":
        if required:
            return st.checkbox(label, key=key, help=help_)
        return st.selectbox(label, [True, False], index=None, key=key, format_func=_show,
                            placeholder=empty, help=help_)
    if typ == "integer":
        return st.number_input(label, value=0 if required else None, step=1, key=key,
                               placeholder=empty, help=help_)
    if typ == "number":
        return st.number_input(label, value=0.0 if required else None, key=key, placeholder=empty,
                               help=help_)
    value = st.text_input(label, key=key, placeholder="" if required else empty, help=help_)
    return value if (value or required) else None


def problems_table(problems: list[dict], rows: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """A 422's problems, one line per bad value, with the value itself when the rows are at hand.
    Rows are numbered from 1, as the API numbers them (1 = the first data row); none for a
    problem of a whole column."""
    out = []
    for p in problems:
        row = p.get("row")
        entry = {
            "Row": int(row) if isinstance(row, int) else None,
            "Field": p.get("field") or "",
            "Error": p.get("error") or "",
        }
        if rows is not None:
            value = ""
            field = p.get("field")
            if isinstance(row, int) and 1 <= row <= len(rows) and field in rows.columns:
                value = rows.iloc[row - 1][field]
            entry["Value"] = "" if value is None else str(value)
        out.append(entry)
    return pd.DataFrame(out)


def show_problems(err: Invalid, rows: Optional[pd.DataFrame] = None, *, what: str = "the input") -> None:
    problems = err.problems
    if not problems:
        common.show_error(err)
        return
    truncated = err.body.get("truncated")
    more = f" (and {truncated} more)" if truncated else ""
    st.error(f"**The model rejected {what}:** {err.message}{more}. Fix these values and try again.", icon=":material/block:")
    common.table(common.styled(problems_table(problems, rows)), hide_index=True,
                 column_config={"Row": st.column_config.NumberColumn(help="1 = the first data row")})
    if rows is not None and len(rows):
        # Row numbers as the API gives them: 1 = the first data row.
        bad = {(p["row"], p["field"]) for p in problems if isinstance(p.get("row"), int) and p.get("field")}

        def highlight(frame: pd.DataFrame) -> pd.DataFrame:
            styles = pd.DataFrame("", index=frame.index, columns=frame.columns)
            for r, field in bad:
                if r in styles.index and field in styles.columns:
                    styles.loc[r, field] = "background-color: #ffc9c9; color: #a61e1e; font-weight: 600"
            return styles

        st.caption("The rows as uploaded, bad values highlighted (row numbers start at 1):")
        view = rows.head(500).copy()
        view.index = view.index + 1
        common.table(view.style.apply(highlight, axis=None))


def predict_form(name: str, detail: dict) -> None:
    features = common.features_of(detail)
    score_name = (detail.get("manifest") or {}).get("score", {}).get("name", "score")
    if not common.allowed("runner", detail, what="Scoring", predict=True):
        return
    st.caption("Fields marked * are required; the others may be left empty.")
    with st.form(f"predict-{name}"):
        values = {}
        cols = st.columns(2)
        for i, f in enumerate(features):
            with cols[i % 2]:
                values[f["name"]] = feature_input(f, key=f"in-{name}-{f['name']}")
        submitted = st.form_submit_button("Score", type="primary", icon=":material/play_arrow:")
    state_key = f"last-score-{name}"
    if submitted:
        row = {k: v for k, v in values.items() if v is not None}
        try:
            with st.spinner("Scoring… (a model scaled to zero starts first)"):
                answer = common.client().predict(name, rows=[row])
            st.session_state[state_key] = {"answer": answer, "row": row, "error": None}
        except ControlError as err:
            st.session_state[state_key] = {"answer": None, "row": row, "error": err}
        # Once more from the top: the header above (status, replicas, requests) has changed.
        st.rerun()
    last = st.session_state.get(state_key)
    if not last:
        return
    if last["error"] is not None:
        err = last["error"]
        if isinstance(err, Invalid):
            show_problems(err, what="this row")
        else:
            common.show_error(err)
        return
    answer = last["answer"]
    scores = answer.get("scores") or []
    if scores:
        cols = st.columns([1, 2])
        cols[0].metric(score_name, f"{scores[0]:.4f}", border=True)
        cols[1].caption(f"Scored by **{answer.get('model', name)}** version "
                        f"**{answer.get('version', '?')}**")
        cols[1].json(last["row"], expanded=True)


# -- CSV scoring --------------------------------------------------------------------------

def score_csv(name: str, detail: dict, data: bytes, *, on_progress=None) -> dict:
    """The whole file's answer (`scores`, and `passthrough` columns when the model declares
    some): a file over the model's max_rows (or max_body) goes in requests sent in parallel, up
    to its most replicas, pinned to one version, and the answers are joined in order."""
    manifest = detail.get("manifest") or {}
    limits = manifest.get("limits") or {}
    traffic = detail.get("traffic") or {}
    steady = traffic.get("live") and not traffic.get("candidate") and not traffic.get("percent")
    return common.client().predict_csv(
        name, data,
        max_rows=int(limits.get("max_rows") or DEFAULT_MAX_ROWS),
        max_body=parse_size(limits.get("max_body")),
        parallel=int((manifest.get("scaling") or {}).get("max") or 1),
        live=traffic.get("live") if steady else None,
        on_progress=on_progress)


def scored_table(rows: pd.DataFrame, answer: dict, score_name: str) -> pd.DataFrame:
    """The scores beside the rows: the answer's passthrough columns first (as it gives them),
    then the score, then the other input columns."""
    scores = answer.get("scores") or []
    passthrough = answer.get("passthrough") if isinstance(answer.get("passthrough"), dict) else {}
    if not passthrough:
        result = rows.copy()
        result[score_name] = scores
        return result
    front = pd.DataFrame({c: list(v) for c, v in passthrough.items()})
    front[score_name] = scores
    rest = rows.drop(columns=[c for c in passthrough if c in rows.columns] + (
        [score_name] if score_name in rows.columns else []))
    return pd.concat([front.reset_index(drop=True), rest.reset_index(drop=True)], axis=1)


def histogram(scores: list[float], bins: int = 20) -> pd.DataFrame:
    values = np.asarray(scores, dtype=float)
    lo, hi = float(values.min()), float(values.max())
    if math.isclose(lo, hi):
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    labels = [f"{edges[i]:.3g}–{edges[i + 1]:.3g}" for i in range(len(counts))]
    return pd.DataFrame({"score range": pd.Categorical(labels, categories=labels, ordered=True),
                         "rows": counts})


def csv_scoring(name: str, detail: dict) -> None:
    manifest = detail.get("manifest") or {}
    score_name = (manifest.get("score") or {}).get("name", "score")
    max_rows = int((manifest.get("limits") or {}).get("max_rows") or DEFAULT_MAX_ROWS)
    names = [f["name"] for f in common.features_of(detail)]
    if not common.allowed("runner", detail, what="Scoring", predict=True):
        return
    st.caption(f"A CSV with a header row of the feature columns ({', '.join(names)}); "
               "empty cells are missing values.")
    upload = st.file_uploader("CSV to score", type=["csv"], key=f"csv-{name}")
    if upload is None:
        return
    data = upload.getvalue()
    try:
        rows = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several classes for a malformed file
        st.error(f"**{upload.name} is not a readable CSV**: {e}", icon=":material/block:")
        return
    key = f"csv-result-{name}"
    digest = hashlib.sha256(data).hexdigest()
    cached = st.session_state.get(key)
    if not cached or cached["digest"] != digest:
        requests_ = max(1, math.ceil(len(rows) / max_rows))
        label = f"Scoring {len(rows):,} rows" + (f" in {requests_:,} requests…" if requests_ > 1 else "…")
        bar = st.progress(0.0, text=label)

        def progress(done: int, total: int) -> None:
            bar.progress(min(done / total, 1.0) if total else 1.0, text=f"{label} {done:,} of {total:,} scored")

        try:
            with st.spinner(label):
                cached = {"digest": digest, "answer": score_csv(name, detail, data, on_progress=progress),
                          "error": None}
            bar.progress(1.0, text=f"Scored {len(rows):,} rows" + (f" in {requests_:,} requests" if requests_ > 1 else ""))
        except ControlError as err:
            bar.empty()
            cached = {"digest": digest, "answer": None, "error": err}
        st.session_state[key] = cached
    if cached["error"] is not None:
        err = cached["error"]
        if isinstance(err, Invalid):
            show_problems(err, rows, what=upload.name)
        else:
            common.show_error(err)
        return

    scores = cached["answer"].get("scores") or []
    if len(scores) != len(rows):
        st.error(f"**{upload.name}**: {len(rows):,} rows were read but {len(scores):,} scores came back.",
                 icon=":material/block:")
        return
    result = scored_table(rows, cached["answer"], score_name)
    st.success(f"Scored {len(scores):,} rows of {upload.name}.", icon=":material/check_circle:")
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Scores beside the input rows**")
        st.dataframe(result, hide_index=True,
                     column_config={score_name: st.column_config.NumberColumn(format="%.4f")})
        st.download_button("Download scores (CSV)", result.to_csv(index=False).encode(),
                           file_name=f"{upload.name.rsplit('.', 1)[0]}-scores.csv", mime="text/csv",
                           icon=":material/download:", key=f"dl-{name}")
    with right:
        st.markdown(f"**Distribution of {score_name}**")
        st.bar_chart(histogram(scores), x="score range", y="rows", height=260)
        s = pd.Series(scores, dtype=float)
        st.markdown(f"mean **{s.mean():.4f}** · min **{s.min():.4f}** · max **{s.max():.4f}**")


# -- versions -----------------------------------------------------------------------------

def version_state(v: dict) -> str:
    """What a version is, in words (no emoji: plain symbols the default fonts draw)."""
    if v.get("live"):
        return "● live"
    if v.get("failed"):
        return "✗ failed its deploy check"
    if v.get("crashed"):
        return "✗ crashed: not restarted"
    if v.get("crash_error"):
        return "! crashed lately"
    return ""


def versions(name: str, detail: dict) -> None:
    versions = detail.get("versions") or []
    live = next((v["version"] for v in versions if v.get("live")), detail.get("version"))
    if versions:
        common.table(pd.DataFrame([{
            "Version": v.get("version"),
            "Deployed": common.fmt_time(v.get("deployed_at")),
            "State": version_state(v),
        } for v in versions]), hide_index=True)
        for v in versions:
            # a version's failure is shown on it: the model serves from its live version meanwhile
            if v.get("failed"):
                with st.expander(f"Why {v['version']} failed its deploy check (it takes no traffic)"):
                    common.show_failure(v.get("error") or "no reason recorded", title=f"{v['version']}:")
            elif v.get("crash_error") and not v.get("live"):
                with st.expander(f"Why {v['version']} crashed ({name} still serves from {live})"):
                    common.show_failure(v["crash_error"], title=f"{v['version']}:",
                                        tone="error" if v.get("crashed") else "warning")
    # a version that failed its deploy check never takes traffic: not offered
    others = [v["version"] for v in versions if v.get("version") != live and not v.get("failed")]
    if not others:
        st.caption("Only one version is deployed: nothing to roll back to. "
                   "`modelplane deploy` a new version and it appears here.")
        return
    if not common.allowed("deployer", detail, what="Rolling back"):
        return
    pending_key = f"rollback-pending-{name}"
    # pre-selected: the version live before this one if it works, else the newest that works
    previous = (detail.get("traffic") or {}).get("previous")
    target = st.selectbox("Roll back to", others, index=common.last_working(versions, others, previous),
                          key=f"rollback-target-{name}")
    if st.button(f"Roll back to {target}…", key=f"rollback-{name}", icon=":material/undo:"):
        st.session_state[pending_key] = target
    pending = st.session_state.get(pending_key)
    if pending:
        with st.container(border=True):
            st.warning(f"Make **{pending}** live instead of **{live}**? Requests switch to {pending} "
                       "without dropping any in flight.", icon=":material/warning:")
            yes, no = st.columns(2)
            if yes.button(f"Confirm rollback to {pending}", type="primary", key=f"rollback-yes-{name}"):
                st.session_state.pop(pending_key, None)
                try:
                    common.client().rollback(name, version=pending)
                except ControlError as err:
                    common.show_error(err)
                else:
                    st.session_state[f"rollback-done-{name}"] = pending
                    st.rerun()
            if no.button("Cancel", key=f"rollback-no-{name}"):
                st.session_state.pop(pending_key, None)
                st.rerun()
    done = st.session_state.pop(f"rollback-done-{name}", None)
    if done:
        st.success(f"Version {done} is live.", icon=":material/check_circle:")


# -- traffic ------------------------------------------------------------------------------

def traffic(name: str, detail: dict) -> None:
    """The split between the live version and one under rollout: a slider for its share, a
    shadow share, promote and withdraw; what the shadow copies answered beside the live ones."""
    t = detail.get("traffic") or {}
    targets = t.get("targets") or []
    if targets:
        common.table(pd.DataFrame([{
            "Version": x["version"],
            "Role": x.get("role", ""),
            "Share of requests": f"{x['percent']}%",
            "Shadow": f"{x['shadow']}%" if x.get("shadow") else "",
            "Requests": common.fmt_int(x.get("requests")),
            "Errors": common.fmt_int(x.get("errors")),
            "Replicas": x.get("replicas", 0),
        } for x in targets]), hide_index=True)
    live, candidate = t.get("live"), t.get("candidate")
    others = [v["version"] for v in detail.get("versions") or [] if v.get("version") != live]
    done = st.session_state.pop(f"traffic-done-{name}", None)
    if done:
        st.success(done, icon=":material/check_circle:")
    if not others:
        st.caption("Only one version is deployed. `modelplane deploy DIR --no-live` puts a new version beside "
                   "the live one; roll it out here to a share of the requests.")
        return
    if common.allowed("deployer", detail, what="Rolling out, promoting and withdrawing"):
        rollout_controls(name, live, candidate, others, t)
    shadow_report(name)


def rollout_controls(name: str, live: Optional[str], candidate: Optional[str], others: list[str], t: dict) -> None:
    with st.form(f"rollout-{name}"):
        st.markdown(f"**Roll out a version** beside **{live}**")
        version = st.selectbox("Version", others, index=others.index(candidate) if candidate in others else 0,
                               key=f"rollout-version-{name}")
        percent = st.slider("Share of requests it answers (%)", 0, 100, int(t.get("percent") or 0),
                            key=f"rollout-percent-{name}")
        shadow = st.slider(f"Shadow: share of {live}'s requests also sent to it, answers recorded only (%)",
                           0, 100, int(t.get("shadow") or 0), key=f"rollout-shadow-{name}")
        if st.form_submit_button("Apply split", type="primary", icon=":material/call_split:"):
            _change(name, lambda c: c.rollout(name, version=version, percent=percent, shadow=shadow),
                    f"{version} answers {percent}% of requests" + (f", shadow {shadow}%" if shadow else "") + ".")
    if candidate:
        cols = st.columns(2)
        if cols[0].button(f"Promote {candidate}", type="primary", key=f"promote-{name}",
                          icon=":material/rocket_launch:", help=f"{candidate} becomes live and takes every request"):
            _change(name, lambda c: c.promote(name), f"{candidate} is live and takes every request.")
        if cols[1].button("Withdraw the rollout", key=f"withdraw-{name}", icon=":material/undo:",
                          help=f"{live} takes every request again, at once"):
            _change(name, lambda c: c.rollback(name), f"Rollout withdrawn: {live} takes every request.")


def _change(name: str, call, done: str) -> None:
    """Make a traffic change through the API; on success say `done` after the page reruns."""
    try:
        call(common.client())
    except ControlError as err:
        common.show_error(err)
    else:
        st.session_state[f"traffic-done-{name}"] = done
        st.rerun()


def shadow_report(name: str) -> None:
    try:
        report = common.client().shadow(name, threshold=st.session_state.get(f"shadow-threshold-{name}"))
    except ControlError as err:
        common.show_error(err)
        return
    if not report.get("requests"):
        return
    st.markdown(f"**Shadow: {report['candidate']} beside {report['live']}** — {report['requests']:,} mirrored "
                f"request(s), {report['candidate_errors']:,} failed on {report['candidate']}")
    c = report.get("comparison")
    if not c:
        return
    st.number_input("Decision threshold (count rows whose decision flips)", value=None,
                    key=f"shadow-threshold-{name}", placeholder="none")
    show_report({"report": c})


# -- page ---------------------------------------------------------------------------------

def header(detail: dict) -> None:
    name = detail["name"]
    top = st.columns([4, 1], vertical_alignment="center")
    top[0].title(name)
    with top[1]:
        common.status_badge(detail.get("status"))
    st.caption(f"{detail.get('kind', '?')} · {detail.get('language', '?')} · live version "
               f"**{detail.get('version') or '—'}**"
               + (f" · endpoint `{detail['endpoint']}`" if detail.get("endpoint") else ""))
    description = detail.get("description") or (detail.get("manifest") or {}).get("description")
    if description:
        st.markdown(description)
    # the model's health is its live version's: a banner only when the live version does not serve
    if detail.get("error") and detail.get("status") == "failed":
        common.show_failure(detail["error"], title=f"{name} is not serving:")
    elif detail.get("error"):
        common.show_failure(detail["error"], title=f"{name} crashed lately and was restarted:", tone="warning")
    m = common.metrics_of(detail)
    cols = st.columns(5)
    cols[0].metric("Replicas", common.fmt_count(detail.get("replicas", m.get("replicas", 0))))
    cols[1].metric("Requests", common.fmt_int(m.get("requests")),
                   help="HTTP requests answered; one request may score many rows")
    cols[2].metric("p50", common.fmt_ms(m.get("p50_ms")))
    cols[3].metric("p95", common.fmt_ms(m.get("p95_ms")))
    cols[4].metric("Cold starts", common.fmt_int(m.get("cold_starts")))


def page() -> None:
    client = common.client()
    names = client.model_names(include=st.session_state.get("model") or st.query_params.get("model"))
    if not names:
        st.title("Model")
        st.info("No models are registered yet.")
        return
    name = st.selectbox("Model", names, key="model", bind="query-params")
    detail = client.model(name)
    header(detail)
    features = common.features_of(detail)
    if detail.get("kind") == "batch":
        tabs = st.tabs(["Schema", "Versions"])
        with tabs[0]:
            st.info("A batch model scores whole datasets: drop a CSV or give a `gs://` URI on the Jobs page.",
                    icon=":material/inventory_2:")
            st.page_link(common.PAGE_JOBS, label=f"Run {name} on a dataset", icon=":material/inventory_2:",
                         query_params={"batch": name})
            common.table(schema_table(features), hide_index=True)
        with tabs[1]:
            versions(name, detail)
        return
    tabs = st.tabs(["Score a row", "Score a CSV", "Schema", "Versions", "Traffic"])
    with tabs[0]:
        predict_form(name, detail)
    with tabs[1]:
        csv_scoring(name, detail)
    with tabs[2]:
        common.table(schema_table(features), hide_index=True)
        score = (detail.get("manifest") or {}).get("score") or {}
        st.caption(f"Score: **{score.get('name', 'score')}** ({score.get('type', 'number')}), one per row.")
    with tabs[3]:
        versions(name, detail)
    with tabs[4]:
        traffic(name, detail)


common.guarded(page)()
common.guarded(lambda: monitoring.section(st.session_state.get("model")))()
