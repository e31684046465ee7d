"""VISIONS engine: encoders, aligners, readers, flat index, search and training (no Streamlit here)."""

import os

# The product runs offline: every encoder comes from an installed package or weights/, never a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

__version__ = "0.1.0"
