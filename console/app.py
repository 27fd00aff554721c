"""The Streamlit console: `streamlit run console/app.py` (what `modelplane up` / `modelplane console` start).

A thin shell: it names the pages, signs the person in (their own token, or on loopback the
machine's) and shows who they are; each page in `views/` talks to the control API through
`console.client` and nothing else, and offers only what the signed-in role may do.
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
if not common.sign_in(client):  # no token to act with: nothing shows until this browser gives one
    st.stop()
identity = common.identify(client)  # who the pages act as: they hide what its role may not do
with st.sidebar:
    common.sidebar(client, identity)
common.connection_banner(client, identity)

page.run()
