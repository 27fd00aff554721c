"""Jobs: run a batch model on a dataset (dropped into the bucket, or a gs:// URI), follow it, get its scores."""
from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Optional

import pandas as pd
import streamlit as st

from console import common
from console.client import ControlError

REFRESH_SECONDS = 2
#: column widths (px) that fit the page's main column at a laptop's width (the trigger is in the
#: job's detail below the table)
TABLE_WIDTHS = {"Job": 200, "Status": 95, "Dataset": 170, "Version": 65, "Rows": 60, "Scored": 65,
                "Created": 140, "Took (s)": 65, "Error": 80}
PREVIEW_ROWS = 200


def _when(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _duration(job: dict) -> Optional[float]:
    start = _when(job.get("started_at"))
    if not start:
        return None
    end = _when(job.get("finished_at")) or datetime.now(timezone.utc)
    return max(0.0, (end - start).total_seconds())


def _short(ts: Optional[str]) -> str:
    """A time as every page writes it (local, 24-hour); "" when there is none."""
    return common.fmt_time(ts) if _when(ts) else ""


def _left(seconds: Optional[float]) -> str:
    if seconds is None:
        return "estimating time left…"
    s = int(round(seconds))
    if s < 60:
        return f"about {s} s left"
    return f"about {s // 60} min {s % 60:02d} s left" if s < 3600 else f"about {s // 3600} h {s // 60 % 60:02d} min left"


def progress_of(job: dict) -> tuple[float, str]:
    """(fraction done, label) of a queued or running job: rows scored of the dataset's rows and
    the time left when the service reports them, else how long it has been running."""
    status = job.get("status")
    if status == "queued":
        return 0.0, "waiting for a worker"
    scored, total = job.get("rows_scored"), job.get("rows_total")
    if isinstance(scored, int) and isinstance(total, int) and total > 0:
        frac = min(max(scored / total, 0.0), 1.0)
        return frac, f"{scored:,} / {total:,} rows scored ({frac:.0%}) · {_left(job.get('eta_seconds'))}"
    if isinstance(scored, int):
        return 0.0, f"{scored:,} rows scored · checking the dataset's rows…"
    took = _duration(job)
    return 0.0, f"running for {took or 0:.0f} s · starting the model…"


def running_panel(jobs: list[dict]) -> None:
    """A progress bar per queued or running job (refreshed with the list)."""
    active = [j for j in jobs if j.get("status") in ("queued", "running")]
    if not active:
        return
    with st.container(border=True):
        st.markdown(f"**In progress** — {len(active)} job(s)")
        for job in active:
            frac, label = progress_of(job)
            st.progress(frac, text=f"`{job['id']}` · {label}")


def submit_panel(model: str, detail: Optional[dict] = None) -> None:
    if not common.allowed("runner", detail, what=f"Running {model} on a dataset"):
        return
    drop, uri = st.columns(2)
    with drop, st.container(border=True):
        st.markdown("**Drop a dataset**")
        st.caption(f"Stored at `incoming/{model}/` in the bucket: the bucket event starts the job, "
                   "exactly as a file dropped there by any other tool would.")
        upload = st.file_uploader("Dataset (CSV with the feature columns)", type=["csv"],
                                  key=f"dataset-{model}")
        if st.button("Upload and run", type="primary", icon=":material/upload:", disabled=upload is None,
                     key=f"upload-{model}"):
            try:
                with st.spinner(f"Uploading {upload.name}…"):
                    stored = common.client().upload_dataset(model, filename=upload.name, data=upload.getvalue())
            except ControlError as err:
                common.show_error(err)
            else:
                st.session_state.setdefault("awaiting", []).append({"model": model, "uri": stored.get("uri")})
                st.session_state["job-notice"] = f"Uploaded to `{stored.get('uri')}`; the bucket event starts the job."
    with uri, st.container(border=True):
        st.markdown("**Run on a `gs://` URI**")
        st.caption("A CSV already in a bucket the plane can read.")
        dataset = st.text_input("Dataset URI", placeholder="gs://bucket/path/data.csv", key=f"uri-{model}")
        if st.button("Run job", type="primary", icon=":material/play_arrow:", disabled=not dataset, key=f"run-{model}"):
            if not dataset.startswith("gs://"):
                st.error("Expected a URI such as `gs://bucket/path/data.csv`.", icon=":material/block:")
            else:
                try:
                    job = common.client().submit_job(model, dataset=dataset.strip())
                except ControlError as err:
                    common.show_error(err)
                else:
                    st.session_state["job-notice"] = f"Job `{job.get('id')}` is {job.get('status', 'queued')}."
                    st.session_state[f"job-{model}"] = job.get("id")
    notice = st.session_state.pop("job-notice", None)
    if notice:
        st.success(notice, icon=":material/check_circle:")


def results_preview(job: dict) -> None:
    cache = st.session_state.setdefault("job-results", {})
    data = cache.get(job["id"])
    if data is None:
        data = common.client().job_results(job["id"])
        cache[job["id"]] = data
    try:
        frame = pd.read_csv(io.BytesIO(data))
    except Exception as e:  # pandas raises several classes for a malformed file
        st.error(f"The results could not be read as CSV: {e}")
        return
    st.markdown(f"**Scores** — {len(frame):,} rows" + (f", first {PREVIEW_ROWS} shown" if len(frame) > PREVIEW_ROWS else ""))
    common.table(frame.head(PREVIEW_ROWS), hide_index=True)
    st.download_button("Download scores (CSV)", data, file_name=f"{job['model']}-{job['id']}-scores.csv",
                       mime="text/csv", icon=":material/download:", key=f"dl-{job['id']}")


def job_detail(job: dict) -> None:
    with st.container(border=True):
        top = st.columns([4, 1], vertical_alignment="center")
        top[0].markdown(f"**Job `{job['id']}`** · {job.get('model')} v{job.get('version') or '?'} · "
                        f"{job.get('trigger') or 'api'}")
        with top[1]:
            common.job_badge(job.get("status"))
        st.caption(f"Dataset `{job.get('dataset') or '—'}` · created {common.fmt_time(job.get('created_at'))}")
        status = job.get("status")
        took = _duration(job)
        if status in ("queued", "running"):
            frac, label = progress_of(job)
            st.progress(frac, text=label)
            return
        cols = st.columns(3)
        cols[0].metric("Rows", common.fmt_int(job.get("rows")))
        cols[1].metric("Took", f"{took:.1f} s" if took is not None else "—")
        cols[2].metric("Finished", common.fmt_time(job.get("finished_at"), clock=True),
                       help=common.fmt_time(job.get("finished_at")))
        if status == "succeeded":
            if job.get("results_uri"):
                st.caption(f"Results at `{job['results_uri']}`")
            results_preview(job)
        elif status == "failed":
            st.error(f"**The job failed:** {common.scrub(job.get('error') or 'no reason given')}",
                     icon=":material/error:")
            st.markdown("**Log tail**")
            if job.get("log_tail"):
                st.code(common.scrub(job["log_tail"]), language=None, height=common.OUTPUT_HEIGHT)
            else:
                st.caption("The job wrote no log output before it failed.")


def jobs_view(model: str) -> None:
    jobs = common.client().jobs(model=model)
    awaiting = [a for a in st.session_state.get("awaiting", []) if a["model"] == model]
    datasets = {j.get("dataset") for j in jobs}
    for a in awaiting:
        if a["uri"] in datasets:
            st.session_state["awaiting"].remove(a)
            match = next(j for j in jobs if j.get("dataset") == a["uri"])
            st.session_state[f"job-{model}"] = match["id"]
        else:
            st.info(f"Waiting for the bucket event for `{a['uri']}`…", icon=":material/hourglass_top:")
    if not jobs:
        st.caption(f"No jobs for {model} yet.")
        return
    running_panel(jobs)
    table = pd.DataFrame([{
        "Job": j["id"],
        "Status": common.status_label(j.get("status"), common.JOB_STATUS),
        "Dataset": j.get("dataset") or "",
        "Version": j.get("version") or "",
        "Rows": j.get("rows") if j.get("rows") is not None else j.get("rows_total"),
        "Scored": j.get("rows_scored"),
        "Created": _short(j.get("created_at")),
        "Took (s)": round(d, 1) if (d := _duration(j)) is not None else None,
        "Error": j.get("error") or "",
    } for j in jobs])
    for column in ("Rows", "Scored", "Took (s)"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    # widths that fit the page: a long dataset URI or error is cut in its cell (hover shows it), never
    # pushing the table past the page's right edge
    common.table(common.styled(table, counts=["Rows", "Scored"]), hide_index=True,
                 column_config={column: st.column_config.Column(width=width) for column, width in TABLE_WIDTHS.items()})
    ids = [j["id"] for j in jobs]
    wanted = st.session_state.get(f"job-{model}")
    default = ids.index(wanted) if wanted in ids else 0
    chosen = st.selectbox("Job", ids, index=default, key=f"job-pick-{model}-{wanted}",
                          format_func=lambda i: f"{i} — {next(j.get('status') for j in jobs if j['id'] == i)}")
    job_detail(next(j for j in jobs if j["id"] == chosen))


def page() -> None:
    st.title("Jobs")
    # a realtime model runs on a file too: the job streams it through the model's replicas
    include = st.session_state.get("batch") or st.query_params.get("batch")
    batch = sorted({*common.client().model_names(kind="batch", include=include),
                    *common.client().model_names(kind="realtime", include=include)})
    if not batch:
        st.info("No models are registered yet.")
        return
    model = st.selectbox("Model", batch, key="batch", bind="query-params")
    submit_panel(model, common.client().model(model) if common.me() else None)
    st.subheader("Jobs")
    st.fragment(run_every=REFRESH_SECONDS)(common.guarded(lambda: jobs_view(model)))()


common.guarded(page)()
