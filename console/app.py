"""The Streamlit console: `streamlit run console/app.py` (what `modelplane up` / `modelplane console` start).

A thin shell: it names the pages and shows where the control service is; each page in
`views/` talks to the control API through `console.client` and nothing else.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run console/app.py` puts console/ on sys.path, not the repository root.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from console import common  # noqa: E402

st.set_page_config(page_title="modelplane", page_icon=":material/hub:", layout="wide")

pages = [
    st.Page(common.PAGE_MODELS, title="Models", icon=":material/apps:", default=True),
    st.Page(common.PAGE_MODEL, title="Model", icon=":material/model_training:"),
    st.Page(common.PAGE_JOBS, title="Jobs", icon=":material/inventory_2:"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page(common.PAGE_ACTIVITY, title="Activity", icon=":material/monitoring:"),
]
page = st.navigation(pages)

client = common.client()
if not common.sign_in(client):  # beyond loopback, nothing shows until this browser gives the token
    st.stop()
with st.sidebar:
    st.caption(f"Control service: `{client.url}`")
    st.caption("Token: " + ("given in this browser" if common.exposed() else "set") if client.token else "Token: not set")
    if common.exposed() and st.button("Sign out", key="sign-out"):
        st.session_state.pop(common.SESSION_TOKEN, None)
        st.rerun()
common.connection_banner(client)

page.run()
