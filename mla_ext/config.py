"""MLAConfig: what a conversion keeps (RoPE pairs) and how it compresses (latent width, SVD)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .convert.budget import ROPE_PAIR_STEP
from .convert.lowrank import JOINT_METHODS, SVD_METHODS
from .convert.rope_correction import DEFAULT_ROPE_CORRECTION, check_correction
from .convert.rope_selection import CALIBRATED_STRATEGIES, STRATEGIES

AUTO = "auto"  # rope_pairs chosen per layer by the cache budget
DEFAULT_CACHE_RATIO = 0.1875  # -81.25 %, the paper's d_kv = d_h/4 cache (its Table 1)


@dataclass
class MLAConfig:
    """Settings of an MHA2MLA conversion (ARCHITECTURE section 2).

    rope_strategy: which frequency pairs keep RoPE: "rotation" (default: 2-norm weighted by
        how much each pair turns over the distances the heads attend to; the best measured,
        docs/results.md), "greedy" (per layer and KV head, add the pair whose rotation most
        reduces the attention-output error on a calibration sample, as EliteKV's RoPElite),
        "2-norm" (the paper's), "high", "low", "uniform" or "full". The calibration-based ones
        need ``calibrate(..., **config.calibration_options())``.
    rope_pairs: pairs kept per KV head (``r``); None keeps all ``d_h/2`` (no partial RoPE);
        "auto" (default) lets the cache budget choose ``r`` and the latent width per layer.
    d_kv: latent width per KV head with an int or None rope_pairs; the layer's latent is
        ``D_c = d_kv * H_kv``. None keeps full rank (lossless). Not with rope_pairs="auto".
    svd: "activation-score" (default: the joint activation-aware SVD with the NoPE key rows
        weighted by the queries' second moment and the value rows by ``W_o^T W_o``, i.e. for
        the error of the scores and of the attention output rather than of the keys and
        values; convert/lowrank.py; the best measured), "activation" (activation-aware joint
        SVD, unweighted rows), the paper's weight SVD "joint" / "split", or
        "activation-split".
    cache_ratio: a cache budget instead of a fixed d_kv: the converted cache (bf16, RoPE keys
        included) is this fraction of the original one (0.1875 = -81.25 %); d_kv is then
        ignored. With an int rope_pairs every layer keeps that many pairs and the latent width
        is spread over the layers by their spectra; with rope_pairs="auto" each layer's split
        between RoPE pairs and latent width is chosen by the error it adds on calibration text
        (convert/budget.py). Needs a joint svd ("joint", "activation", "activation-score").
        None: ``DEFAULT_CACHE_RATIO``
        with rope_pairs="auto", no budget otherwise.
    rope_pair_step: with rope_pairs="auto", every layer keeps a multiple of this many pairs.
        1 (default) searches every ``r`` (the CUDA decode kernel takes every even ``d_r`` up
        to 64); 4 keeps each ``d_r = 2r`` a multiple of 8. Ignored for a fixed rope_pairs.
    rope_correction: what replaces the rotation of a dropped RoPE pair ``j`` in the scores:
        "fitted-attention" or "fitted-uniform", a data-fitted position-free 2x2
        ``M`` per query head and dropped pair (``q[j]^T M k[j]``, folded into ``q_proj``),
        the least-squares fit of the original score terms over the causal (query, key) pairs
        of the calibration text, weighted by the original model's attention probabilities or
        uniformly (convert/rope_correction.py); or "none" (the paper's: ``q[j]^T k[j]``, no
        rotation). A fitted one needs ``calibrate(..., collect_rope_fit=True)`` (in
        ``calibration_options()``). None (default): "fitted-attention" when the rest of the
        config calibrates anyway (the default config does) and drops pairs, "none" otherwise,
        so a weight-only conversion still needs no calibration. Measured on the default model
        (docs/results.md, "Fitted RoPE correction"): "fitted-attention" lowers the default
        conversion's perplexity by 22 % / 12 % on pydoc / Shakespeare; "fitted-uniform" makes
        it worse. A config read back from a checkpoint written before this option has "none".
    svd_key_weight: with svd="activation-score", the weight of the key rows' (score) error
        against the value rows' (output) error, relative to the balance of "activation"
        (1.0, default).

    The default, rotation-aware RoPE with ``r`` per layer and the score/output-weighted
    activation-aware SVD under a -81.25 % budget, with the attention-weighted fitted correction
    of the dropped pairs, is the best measured training-free conversion of the default model
    (docs/results.md: 9.1x / 8.2x the original perplexity on pydoc / Shakespeare; 10.9x /
    10.7x with svd="activation", 13.9x / 12.2x without the correction either, 18.8x / 15.7x
    for r = 6, d_kv = 12 in every layer). The paper's settings:
    ``MLAConfig(rope_strategy="2-norm", rope_pairs=4, d_kv=16, svd="joint",
    rope_correction="none")``.
    """

    rope_strategy: str = "rotation"
    rope_pairs: int | str | None = AUTO
    d_kv: int | None = None
    svd: str = "activation-score"
    cache_ratio: float | None = None
    rope_pair_step: int = ROPE_PAIR_STEP
    rope_correction: str | None = None
    svd_key_weight: float = 1.0

    def __post_init__(self):
        if self.rope_strategy not in STRATEGIES:
            raise ValueError(f"rope_strategy must be one of {STRATEGIES}, got {self.rope_strategy!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {self.svd!r}")
        for name in ("rope_pairs", "d_kv"):
            value = getattr(self, name)
            if name == "rope_pairs" and value == AUTO:
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                also = ', "auto"' if name == "rope_pairs" else ""
                raise ValueError(f"{name} must be a positive int{also} or None, got {value!r}")
        step = self.rope_pair_step
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"rope_pair_step must be a positive int, got {step!r}")
        if self.rope_pairs == AUTO:
            if self.d_kv is not None:
                raise ValueError('rope_pairs="auto" chooses each layer\'s latent width under the '
                                 f"cache budget; d_kv={self.d_kv} needs an int rope_pairs "
                                 "(e.g. rope_pairs=4, d_kv=16, the paper's)")
            if self.cache_ratio is None:
                self.cache_ratio = DEFAULT_CACHE_RATIO
        if self.cache_ratio is not None:
            ratio = self.cache_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) \
                    or not 0 < ratio <= 1:
                raise ValueError(f"cache_ratio must be a number in (0, 1], got {ratio!r}")
            if self.svd not in JOINT_METHODS:
                raise ValueError(f"cache_ratio needs svd in {JOINT_METHODS}, got {self.svd!r}")
        if self.rope_correction is None:
            self.rope_correction = "none"
            if self.needs_calibration and self.rope_pairs is not None:
                self.rope_correction = DEFAULT_ROPE_CORRECTION
        check_correction(self.rope_correction)
        weight = self.svd_key_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not 0 < weight < float("inf"):
            raise ValueError(f"svd_key_weight must be a finite float > 0, got {weight!r}")
        if weight != 1.0 and self.svd != "activation-score":
            raise ValueError(f"svd_key_weight={weight} weights the key rows of "
                             f"svd='activation-score', not of svd={self.svd!r}")

    @property
    def needs_calibration(self) -> bool:
        partial = self.rope_pairs is not None and self.rope_strategy in CALIBRATED_STRATEGIES
        # the per-layer split is chosen on calibration text whatever the strategy
        return (partial or self.svd.startswith("activation") or self.rope_pairs == AUTO
                or self.needs_rope_fit)

    @property
    def needs_distances(self) -> bool:
        """Whether calibration must record attention distances (the "rotation" selection)."""
        return self.rope_pairs is not None and self.rope_strategy == "rotation"

    @property
    def needs_attention_sample(self) -> bool:
        """Whether calibration must keep an attention sample (the "greedy" selection)."""
        return self.rope_pairs is not None and self.rope_strategy == "greedy"

    @property
    def needs_rope_fit(self) -> bool:
        """Whether calibration must sum the fitted RoPE correction's normal equations."""
        return self.rope_pairs is not None and self.rope_correction != "none"

    def calibration_options(self) -> dict:
        """The keyword arguments of ``calibrate`` that this config needs."""
        return {"collect_xtx": self.svd.startswith("activation"),
                "collect_distances": self.needs_distances,
                "collect_attention_sample": self.needs_attention_sample,
                "collect_rope_fit": self.needs_rope_fit,
                "collect_query_gram": self.svd == "activation-score"}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MLAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown MLAConfig fields {sorted(unknown)}")
        # written before the option existed: converted without a correction
        return cls(**{"rope_correction": "none", **data})
