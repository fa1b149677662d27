"""Calibration: proxy text → each expert's per-layer input second moments XᵀX, out-of-core."""
