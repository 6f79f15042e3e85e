"""MLAConfig: what a conversion keeps (RoPE pairs) and how it compresses (latent width, SVD)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .convert.lowrank import SVD_METHODS
from .convert.rope_selection import STRATEGIES


@dataclass
class MLAConfig:
    """Settings of an MHA2MLA conversion (ARCHITECTURE section 2).

    rope_strategy: which frequency pairs keep RoPE: "rotation" (default: 2-norm weighted by
        how much each pair turns over the distances the heads attend to; the best measured,
        docs/results.md), "2-norm" (the paper's), "high", "low", "uniform" or "full". The
        calibration-based ones need ``calibrate(..., **config.calibration_options())``.
    rope_pairs: pairs kept per KV head (``r``); None keeps all ``d_h/2`` (no partial RoPE).
    d_kv: latent width per KV head; the layer's latent is ``D_c = d_kv * H_kv``. None keeps
        full rank (lossless).
    svd: "activation" (default: activation-aware joint SVD, the best measured), or the paper's
        weight SVD "joint" / "split", or "activation-split".
    cache_ratio: a cache budget instead of a fixed d_kv: the converted cache (bf16, RoPE keys
        included) is this fraction of the original one (0.1875 = -81.25 %), the latent width
        spread over the layers by their spectra; d_kv is then ignored. Needs svd "joint" or
        "activation".
    """

    rope_strategy: str = "rotation"
    rope_pairs: int | None = 4
    d_kv: int | None = 16
    svd: str = "activation"
    cache_ratio: float | None = None

    def __post_init__(self):
        if self.rope_strategy not in STRATEGIES:
            raise ValueError(f"rope_strategy must be one of {STRATEGIES}, got {self.rope_strategy!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {self.svd!r}")
        for name in ("rope_pairs", "d_kv"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.cache_ratio is not None:
            if isinstance(self.cache_ratio, bool) or not 0 < float(self.cache_ratio) <= 1:
                raise ValueError(f"cache_ratio must be in (0, 1], got {self.cache_ratio!r}")
            if self.svd not in ("joint", "activation"):
                raise ValueError(f"cache_ratio needs svd 'joint' or 'activation', got {self.svd!r}")

    @property
    def needs_calibration(self) -> bool:
        partial = self.rope_pairs is not None and self.rope_strategy in ("2-norm", "rotation")
        return partial or self.svd.startswith("activation")

    @property
    def needs_distances(self) -> bool:
        """Whether calibration must record attention distances (the "rotation" selection)."""
        return self.rope_pairs is not None and self.rope_strategy == "rotation"

    def calibration_options(self) -> dict:
        """The keyword arguments of ``calibrate`` that this config needs."""
        return {"collect_xtx": self.svd.startswith("activation"),
                "collect_distances": self.needs_distances}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MLAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown MLAConfig fields {sorted(unknown)}")
        return cls(**data)
