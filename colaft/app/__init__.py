"""The application: the command line, runs on disk, the training loop, experiments and baselines."""
import os

# Our models and data are installed locally; never reach for the Hugging Face hub. Set
# before transformers is imported (by any module of the application), which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
