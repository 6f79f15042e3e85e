"""MLAConfig: what a conversion keeps (RoPE pairs) and how it compresses (latent width, SVD)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .cache_format import CacheFormat, search_formats
from .convert.budget import ROPE_PAIR_STEP
from .convert.rope_mixing import SHARED_STRATEGIES
from .convert.lowrank import JOINT_METHODS, SVD_METHODS
from .convert.rope_correction import DEFAULT_ROPE_CORRECTION, check_correction
from .convert.rope_selection import CALIBRATED_STRATEGIES, STRATEGIES

AUTO = "auto"  # rope_pairs chosen per layer by the cache budget
ROPE_SHARINGS = ("per-head", "shared", AUTO)
NO_FORMATS = "none"  # cache_formats: bf16 counted, values unrounded, nothing stored
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
    cache_ratio: a cache budget instead of a fixed d_kv: the converted cache's stored bytes
        per token (RoPE keys, scales and zeros included, in each layer's format) are at most
        this fraction of the original bf16 K/V cache's (0.1875 = -81.25 %); d_kv is then
        ignored. With an int rope_pairs every layer keeps that many pairs and the latent width
        is spread over the layers by their spectra; with rope_pairs="auto" each layer's split
        between RoPE pairs and latent width is chosen by the error it adds on calibration text
        (convert/budget.py). Needs a joint svd ("joint", "activation", "activation-score").
        None: ``DEFAULT_CACHE_RATIO``
        with rope_pairs="auto" (unless cache_bytes_per_token is given), no budget otherwise.
    cache_bytes_per_token: the same budget as a number of bytes per token summed over all
        layers (what ``kv_cache_bytes_per_token`` of the converted model gives at most); an
        alternative to cache_ratio, not with it.
    cache_formats: the storage formats of the cache (mla_ext/cache_format.py). "auto": under a
        budget with rope_pairs="auto", each layer's format is searched with its split among
        those the CUDA decode kernel serves (``cache_format.SEARCH_LATENTS`` x
        ``SEARCH_ROPES``: bf16, int8 and int4 latents with their group sizes, bf16 or fp8 RoPE
        keys), each scored by the error of its actual round trip. "none": bf16 latent and RoPE
        keys counted, the values scored as the model computes them, no format stored
        (``LatentCache`` then defaults to bf16; the search before formats). A spec string
        (``"int4-g32/fp8"``) or a list of them: those candidates; with fixed sizes, one spec is
        stored for every layer. None (default): "auto" with rope_pairs="auto", else "none".
        The chosen formats are saved with the model and are the default of
        ``LatentCache(model)``. Measured on the default model at -81.25 % (docs/results.md,
        "The cache budget in bytes"): "auto" 16.9 / 88.2 on pydoc / Shakespeare against 98.3 /
        360.8 for "none".
    rope_sharing: "per-head": one RoPE key per KV head; "shared": one RoPE key for all heads,
        mixed per frequency from the KV heads' pairs (convert/rope_mixing.py; rope_pairs then
        counts its pairs, None keeps all ``H_kv d_h/2``); "auto": the budget search chooses per
        layer (needs rope_pairs="auto"). None (default): "auto" with rope_pairs="auto" and a
        rope_strategy that ranks mixed components ("rotation", "2-norm"), else "per-head".
        Measured on the default model at -81.25 % with cache_formats="auto" (docs/results.md):
        "auto" 14.3 / 70.9 on pydoc / Shakespeare against 16.9 / 88.2 for "per-head"; it
        doubles the search's time.
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

    The default, rotation-aware RoPE with ``r``, RoPE-key sharing, latent width and cache
    format per layer and the score/output-weighted activation-aware SVD under a -81.25 % budget
    of stored bytes, with the attention-weighted fitted correction of the dropped pairs, is the
    best measured training-free conversion of the default model (docs/results.md: 1.32x /
    1.62x the original perplexity on pydoc / Shakespeare, read back through its cache; 1.57x /
    2.01x with rope_sharing="per-head"; 9.1x / 8.2x with bf16 only, cache_formats="none",
    10.9x / 10.7x with svd="activation" too, 13.9x / 12.2x without the
    correction either, 18.8x / 15.7x for r = 6, d_kv = 12 in every layer). The paper's settings:
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
    cache_bytes_per_token: int | None = None
    cache_formats: str | list | None = None
    rope_sharing: str | None = None

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
            if self.cache_ratio is None and self.cache_bytes_per_token is None:
                self.cache_ratio = DEFAULT_CACHE_RATIO
        if self.cache_formats is None:
            self.cache_formats = AUTO if self.rope_pairs == AUTO else NO_FORMATS
        if self.rope_sharing is None:
            searched = self.rope_pairs == AUTO and self.rope_strategy in SHARED_STRATEGIES
            self.rope_sharing = AUTO if searched else "per-head"
        if self.cache_ratio is not None:
            ratio = self.cache_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) \
                    or not 0 < ratio <= 1:
                raise ValueError(f"cache_ratio must be a number in (0, 1], got {ratio!r}")
            if self.svd not in JOINT_METHODS:
                raise ValueError(f"cache_ratio needs svd in {JOINT_METHODS}, got {self.svd!r}")
        self._check_bytes_and_formats()
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

    def _check_bytes_and_formats(self) -> None:
        per_token = self.cache_bytes_per_token
        if per_token is not None:
            if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
                raise ValueError(f"cache_bytes_per_token must be a positive int, got {per_token!r}")
            if self.cache_ratio is not None:
                raise ValueError(f"cache_ratio={self.cache_ratio} and cache_bytes_per_token="
                                 f"{per_token} are two budgets; give one")
            if self.svd not in JOINT_METHODS:
                raise ValueError(f"cache_bytes_per_token needs svd in {JOINT_METHODS}, "
                                 f"got {self.svd!r}")
        if self.rope_sharing not in ROPE_SHARINGS:
            raise ValueError(f"rope_sharing must be one of {ROPE_SHARINGS}, "
                             f"got {self.rope_sharing!r}")
        searched = self.rope_pairs == AUTO
        if self.rope_sharing == AUTO and not searched:
            raise ValueError('rope_sharing="auto" is chosen per layer by the budget search: it '
                             'needs rope_pairs="auto"')
        if self.rope_sharing != "per-head" and self.rope_pairs is not None \
                and self.rope_strategy not in SHARED_STRATEGIES:
            raise ValueError(f"rope_sharing={self.rope_sharing!r} ranks the mixed components "
                             f"with rope_strategy in {SHARED_STRATEGIES}, "
                             f"got {self.rope_strategy!r}")
        if self.rope_sharing == "shared" and self.has_budget and not searched:
            raise ValueError('rope_sharing="shared" under a cache budget needs rope_pairs="auto" '
                             "(the fixed-r budget spreads latent values over the layers)")
        formats = self.format_candidates()
        if formats is not None and self.has_budget and not searched:
            raise ValueError(f"cache_formats={self.cache_formats!r} under a cache budget needs "
                             'rope_pairs="auto" (the search chooses each layer\'s format)')
        if formats is not None and len(formats) > 1 and not self.has_budget:
            raise ValueError(f"cache_formats={self.cache_formats!r} lists candidates for a budget "
                             "search; with fixed sizes give one format, e.g. 'int4-g32/fp8'")

    @property
    def has_budget(self) -> bool:
        return self.cache_ratio is not None or self.cache_bytes_per_token is not None

    def format_candidates(self) -> list[CacheFormat] | None:
        """The cache formats the conversion chooses from (None: bf16 counted, values unrounded,
        nothing stored); ValueError naming cache_formats for a bad spec."""
        spec = self.cache_formats
        if spec is None or spec == NO_FORMATS:
            return None
        try:
            if spec == AUTO:
                return search_formats()
            if isinstance(spec, str):
                return [CacheFormat.parse(spec)]
            if isinstance(spec, (list, tuple)) and spec:
                return [CacheFormat.parse(s) for s in spec]
        except ValueError as exc:
            raise ValueError(f"cache_formats: {exc}") from None
        raise ValueError(f'cache_formats must be None, "auto", "none", a format spec like '
                         f"'int4-g32/fp8' or a non-empty list of them, got {spec!r}")

    def sharings(self) -> tuple[str, ...]:
        """The RoPE-key sharings the budget search tries."""
        return ("per-head", "shared") if self.rope_sharing == AUTO else (self.rope_sharing,)

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
        # written before the options existed: converted without a correction, without formats
        return cls(**{"rope_correction": "none", "cache_formats": NO_FORMATS,
                      "rope_sharing": "per-head", **data})
