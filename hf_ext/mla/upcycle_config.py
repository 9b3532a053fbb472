"""What ``upcycle_to_mla`` is asked for (``UpcycleConfig``), checked (``validate_upcycle``) and settled for one
source model (``resolve_upcycle`` -> ``Resolved``): ranks, RoPE dims and the DeepSeek-V3 constraints.

Example:
    >>> from hf_ext.mla import UpcycleConfig
    >>> UpcycleConfig(kv_ratio=6.4).qk_rope_head_dim
    24
"""
from __future__ import annotations

from dataclasses import dataclass, replace


from ..errors import HfExtError
from .export import check_deepseek_source, deepseek_rope_selection, engine_latent_dims

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
MIN_CALIB_TOKENS_PER_HIDDEN = 2  # C = E[x x^T] needs well over `hidden` samples to be full rank


class UpcycleError(HfExtError, ValueError):
    pass


@dataclass
class UpcycleConfig:
    """How to upcycle. Give exactly one of ``kv_lora_rank``, ``kv_ratio`` or ``energy``.

    The defaults were chosen at 6.4x on SmolLM2-135M by perplexity on a validation slice of
    python-docs:train (never on the eval split); see benchmarks/mla.py for the comparison.

    Args:
        kv_lora_rank: width r of the cached latent.
        kv_ratio: target KV-cache compression vs the source (2*n_kv*head_dim values per token); r follows.
        energy: keep the smallest r (max over layers) whose factorisation keeps this fraction of energy.
        qk_rope_head_dim: width of each decoupled RoPE key (even).
        rope_key_sharing: "shared" (one RoPE key, DeepSeek / X-EcoMLA) or "per_kv_head" (MHA2MLA).
        rope_rotation: "rorope" (TransMLA's PCA across heads per frequency; shared keys only), "none", or
            "auto": rorope where it applies (shared keys, no per-head q/k norm), else none.
        rope_selection: "qk_freq", "2norm" or "high_freq" (see the module docstring).
        kv_init: "qo_whitened", "whitened" or "svd".
        nope_rotation: "mean" replaces the rotation of every pair that leaves RoPE by its expectation over
            the attention distances measured on calibration text (``ops.mean_rotation``); "none" drops it.
        key_weight: weight of key (logit) errors relative to value (output) errors in the joint
            factorisation, after both blocks are scaled to equal energy.
        rope_horizon: without measured distances, ``qk_freq`` weighs rotations uniformly over this many tokens.
        rope_stride: ``geometric`` selection's stride c; None chooses it.
        target: ``"hf_ext"`` (our ``MLAForCausalLM`` layout) or ``"deepseek_v3"``: the layout that
            ``export_deepseek_v3`` writes as a stock DeepSeek-V3 checkpoint (one shared RoPE key with
            geometric frequencies, RMSNorm epsilon 1e-6; see ``hf_ext.mla.export``).
        latent_norm_init: with ``target="deepseek_v3"``, DeepSeek's KV latent RMSNorm: ``"identity"`` (default:
            the model has no latent norms and trains without them; the export folds in norms that are the
            identity, ``export.identity_latents``) or ``"gain"`` (the model has the norms and a query latent,
            the KV norm active with the calibrated RMS of c_kv as its gain: every token's K and V are rescaled
            by E[rms(c)] / rms(c_t); distillation anneals it in from the identity, ``DistillConfig.norm_anneal``).
            After the same distillation, "identity" measures 1.31x better (benchmarks/mla_deepseek_cost.py).
    """

    kv_lora_rank: int | None = None
    kv_ratio: float | None = None
    energy: float | None = None
    qk_rope_head_dim: int = 24
    rope_key_sharing: str = "shared"
    rope_rotation: str = "auto"
    rope_selection: str = "qk_freq"
    kv_init: str = "qo_whitened"
    nope_rotation: str = "mean"
    key_weight: float = 4.0
    rope_horizon: int = 2048
    rope_stride: int | None = None
    target: str = "hf_ext"
    latent_norm_init: str = "identity"

    @classmethod
    def lossless(cls, source_config) -> "UpcycleConfig":
        """Every RoPE dim kept per KV head, full rank: the MLA model equals the source."""
        D, n_kv = head_dim(source_config), source_config.num_key_value_heads
        return cls(kv_lora_rank=n_kv * D, qk_rope_head_dim=D, rope_key_sharing="per_kv_head",
                   rope_rotation="none", rope_selection="high_freq", kv_init="svd", nope_rotation="none")

    def needs_calibration(self) -> bool:
        return (self.kv_init != "svd" or self.rope_selection != "high_freq" or self.rope_rotation != "none"
                or self.nope_rotation != "none")


@dataclass(frozen=True)
class Resolved:
    """An ``UpcycleConfig`` settled for one source model by ``resolve_upcycle``; the caller's config is never changed.

    ``config`` is a copy with the open choices made: ``rope_rotation`` ("auto" becomes "rorope" or "none"), the
    RoPE selection of ``target="deepseek_v3"`` (``export.deepseek_rope_selection``) and ``kv_lora_rank`` from
    ``kv_ratio``. Two are known only once every layer is planned (``upcycle_to_mla``): ``kv_lora_rank`` from
    ``energy``, and the stride of a ``"geometric"`` selection that gave none (``_plan_model``); both are None here.

    Example:
        >>> res = resolve_upcycle(smollm2_135m, UpcycleConfig(kv_ratio=6.4))     # doctest: +SKIP
        >>> res.config.kv_lora_rank, res.config.rope_rotation, res.n_rope  # doctest: +SKIP
        (36, 'rorope', 1)
    """

    config: UpcycleConfig   # the settled settings (see above)
    H: int                  # query heads
    n_kv: int               # source KV heads
    D: int                  # source head width (head_dim)
    n_rope: int             # RoPE key heads: 1 ("shared") or n_kv ("per_kv_head")
    max_rank: int           # the largest kv_lora_rank: min(rows of [K_nope; V], hidden size)
    qk_norm: bool           # the source RMS-normalises each query and key head (Qwen3)


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def has_qk_norm(model) -> bool:
    return hasattr(model.model.layers[0].self_attn, "k_norm")


def _cache_budget(cfg, ucfg: UpcycleConfig, qk_norm: bool) -> tuple[int, int, int]:
    """``(n_rope, side, max_rank)``: RoPE key heads; values cached per token next to the latent (the RoPE keys,
    plus one key scale per KV head with qk_norm); the largest rank: rows of [K_nope; V], or the input width."""
    D, n_kv, d_r = head_dim(cfg), cfg.num_key_value_heads, ucfg.qk_rope_head_dim
    n_rope = 1 if ucfg.rope_key_sharing == "shared" else n_kv
    return n_rope, n_rope * d_r + (n_kv if qk_norm else 0), min(2 * n_kv * D - n_rope * d_r, cfg.hidden_size)


def _ratio_rank(cfg, ucfg: UpcycleConfig, side: int) -> int:
    """kv_lora_rank for ``kv_ratio``: the source's 2*n_kv*head_dim values per token over the ratio, less ``side``."""
    return round(2 * cfg.num_key_value_heads * head_dim(cfg) / ucfg.kv_ratio) - side


def validate_upcycle(model, ucfg: UpcycleConfig) -> None:
    """Raise ``UpcycleError`` (``ExportError`` for what DeepSeek-V3 cannot express) on a source or a setting that
    cannot be upcycled, naming the fix. Reads only: ``ucfg`` is left as given."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise UpcycleError(f"model type '{cfg.model_type}' is not supported for MLA upcycling; "
                           f"supported: {', '.join(SUPPORTED)}")
    qk_norm = has_qk_norm(model)
    for name, allowed in [("rope_key_sharing", ("shared", "per_kv_head")), ("rope_rotation", ("auto", "rorope", "none")),
                          ("rope_selection", ("qk_freq", "2norm", "high_freq", "geometric")),
                          ("kv_init", ("qo_whitened", "whitened", "svd")), ("nope_rotation", ("mean", "none"))]:
        if getattr(ucfg, name) not in allowed:
            raise UpcycleError(f"{name}={getattr(ucfg, name)!r}; choose one of {', '.join(allowed)}")
    if ucfg.target not in ("hf_ext", "deepseek_v3"):
        raise UpcycleError(f"target={ucfg.target!r}; choose 'hf_ext' or 'deepseek_v3'")
    if ucfg.target == "deepseek_v3":
        check_deepseek_source(model, ucfg, qk_norm)
    if sum(x is not None for x in (ucfg.kv_lora_rank, ucfg.kv_ratio, ucfg.energy)) != 1:
        raise UpcycleError("give exactly one of kv_lora_rank, kv_ratio or energy")
    D, d_r = head_dim(cfg), ucfg.qk_rope_head_dim
    if d_r % 2 or not 0 < d_r <= D:
        raise UpcycleError(f"qk_rope_head_dim={d_r}: RoPE rotates pairs, use an even width in 2..{D}")
    if ucfg.rope_rotation == "rorope" and ucfg.rope_key_sharing != "shared":
        raise UpcycleError("rope_rotation='rorope' mixes KV heads into one shared RoPE key; use it with "
                           "rope_key_sharing='shared', or rope_rotation='none'")
    if qk_norm and ucfg.rope_rotation == "rorope":
        raise UpcycleError("rope_rotation='rorope' mixes KV heads, but this model normalises each key head "
                           "on its own (qk_norm); use rope_rotation='none' (or 'auto')")
    if qk_norm and model.model.layers[0].self_attn.k_proj.bias is not None:
        raise UpcycleError("a key bias before a per-head key norm (qk_norm) is not supported; "
                           "supported qk_norm sources have attention_bias=False (Qwen3)")
    _, side, max_rank = _cache_budget(cfg, ucfg, qk_norm)
    if ucfg.kv_ratio is not None:
        if ucfg.kv_ratio <= 1:
            raise UpcycleError(f"kv_ratio={ucfg.kv_ratio} does not compress; use a ratio above 1 (e.g. 6.4)")
        if _ratio_rank(cfg, ucfg, side) < 1:
            raise UpcycleError(f"kv_ratio={ucfg.kv_ratio} leaves no room for a latent next to {side} cached "
                               f"RoPE-key{' and key-scale' if qk_norm else ''} values; lower kv_ratio or qk_rope_head_dim")
    r = ucfg.kv_lora_rank if ucfg.kv_ratio is None else _ratio_rank(cfg, ucfg, side)
    if r is not None and not 0 < r <= max_rank:
        raise UpcycleError(f"kv_lora_rank={r} is above the maximum {max_rank} "
                           f"(min(2*n_kv*head_dim - RoPE dims, hidden_size)); lower it")
    if ucfg.energy is not None and not 0 < ucfg.energy <= 1:
        raise UpcycleError(f"energy={ucfg.energy}; give a fraction in (0, 1]")


def resolve_upcycle(model, ucfg: UpcycleConfig) -> Resolved:
    """Settle what ``ucfg`` (already through ``validate_upcycle``) leaves open for this source; see ``Resolved``."""
    cfg, qk_norm = model.config, has_qk_norm(model)
    n_rope, side, max_rank = _cache_budget(cfg, ucfg, qk_norm)
    rotation = ucfg.rope_rotation
    if rotation == "auto":  # RoRoPE where it applies: one shared RoPE key, no per-head norm after the mixing
        rotation = "rorope" if ucfg.rope_key_sharing == "shared" and not qk_norm else "none"
    selection, stride = (deepseek_rope_selection(ucfg) if ucfg.target == "deepseek_v3"
                         else (ucfg.rope_selection, ucfg.rope_stride))
    rank = ucfg.kv_lora_rank if ucfg.kv_ratio is None else _ratio_rank(cfg, ucfg, side)
    settled = replace(ucfg, rope_rotation=rotation, rope_selection=selection, rope_stride=stride, kv_lora_rank=rank)
    return Resolved(settled, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg), n_rope, max_rank,
                    qk_norm)




DEFAULT_KV_RATIO = 6.4


def resolve_target_dims(source_config, kv_ratio: float | None = None, kv_lora_rank: int | None = None,
                        energy: float | None = None, qk_rope_head_dim: int | None = None,
                        **settings) -> UpcycleConfig:
    """An ``UpcycleConfig`` whose unset sizes take their defaults for ``source_config``'s model (what
    ``hf-ext convert mla`` does): no size at all means ``kv_ratio`` 6.4, or with ``target="deepseek_v3"`` the
    widest latent the serving engines' kernels run well at >= 6x (``export.engine_latent_dims``); an unset
    ``qk_rope_head_dim`` is 24 (32 for those DeepSeek dims). ``settings``: the other ``UpcycleConfig`` fields.

    Example:
        >>> resolve_target_dims(model.config, target="deepseek_v3")       # doctest: +SKIP
        UpcycleConfig(kv_lora_rank=32, ..., qk_rope_head_dim=32, ...)
    """
    rope_dim = qk_rope_head_dim or 24
    if settings.get("target") == "deepseek_v3" and not (kv_ratio or kv_lora_rank or energy):
        kv_lora_rank, rope_dim = engine_latent_dims(source_config, rope_dim=qk_rope_head_dim or 32)
    if kv_ratio is None and kv_lora_rank is None and energy is None:
        kv_ratio = DEFAULT_KV_RATIO
    return UpcycleConfig(kv_ratio=kv_ratio if not (kv_lora_rank or energy) else None, kv_lora_rank=kv_lora_rank,
                         energy=energy, qk_rope_head_dim=rope_dim, **settings)
