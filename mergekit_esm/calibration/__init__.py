"""Calibration: proxy text → each expert's per-layer input statistics (X, XᵀX or ΔW XᵀX ΔWᵀ), out-of-core."""
