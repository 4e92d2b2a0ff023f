"""Trained models: the in-memory bundle, model files, sampling, and importing the original code's checkpoints."""

from feda2v_toolkit.model.bundle import UNIFIED_KEY, GenerativeModel
from feda2v_toolkit.model.file import load_model, save_model

__all__ = ["UNIFIED_KEY", "GenerativeModel", "load_model", "save_model"]
