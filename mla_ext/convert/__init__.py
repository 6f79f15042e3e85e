"""MHA2MLA conversion pieces: calibration statistics, partial-RoPE selection, low-rank K/V."""
from .calibration import Calibration, LayerStats, calibrate
from .lowrank import SVD_METHODS, LowRankKV, factorize_kv, max_rank
from .rope_selection import STRATEGIES, select_rope_pairs, two_norm_scores

__all__ = [
    "Calibration",
    "LayerStats",
    "calibrate",
    "STRATEGIES",
    "select_rope_pairs",
    "two_norm_scores",
    "SVD_METHODS",
    "LowRankKV",
    "factorize_kv",
    "max_rank",
]
