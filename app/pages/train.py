"""Train page: PLACEHOLDER. The training page and its job manager (app/jobs.py) are built in their own issue.

Until then this page only says so, and points at the command line trainer.
"""

import streamlit as st

st.title("Train")
st.info("Training from the browser arrives soon: start a small run, watch the loss fall, then chat with "
        "the model it produced.", icon=":material/construction:")
st.markdown("Meanwhile you can train from a terminal; finished runs appear in the **Model** list on the "
            "Chat page:")
st.code("python -m model.train --preset toy --out runs/my-first-model", language="bash")
