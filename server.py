"""StoryForge web app: `streamlit run server.py` (settings in .streamlit/config.toml: loopback only).

The entrypoint only sets up the page and the navigation; each page is a file under app/pages/.
"""

import streamlit as st

st.set_page_config(page_title="StoryForge", page_icon=":material/auto_stories:", layout="centered")

pages = [
    st.Page("app/pages/chat.py", title="Chat", icon=":material/chat:", default=True),
    st.Page("app/pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("app/pages/models.py", title="Models", icon=":material/inventory_2:"),
]
st.navigation(pages).run()
