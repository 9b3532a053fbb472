"""``SAEConfig`` (what an SAE is) and ``SAEError``, with the SAELens ``cfg.json`` layout it reads and writes.

Architectures and their papers: see ``hf_ext.vit_hooks.sae.modeling_sae``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ...errors import HfExtError

ARCHITECTURES = ("standard", "topk", "jumprelu")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"    # SAELens's SAE_CFG_FILENAME / SAE_WEIGHTS_FILENAME
SAELENS_SCHEMA = "6.0.0"  # the cfg.json schema written; SAELens reads metadata.sae_lens_version to pick its parser
# training-only fields: SAELens keeps them under metadata.training_architecture_details
TRAINING_FIELDS = {"standard": ("l1_coefficient",), "topk": ("aux_k", "aux_k_coefficient"),
                   "jumprelu": ("l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold")}


class SAEError(HfExtError, ValueError):
    """A bad SAE config, or an SAE folder that is incomplete or of another architecture."""


@dataclass
class SAEConfig:
    """What an SAE is; ``cfg.json`` holds it in SAELens's layout (training-only fields under ``metadata``).

    Args:
        d_in: width of the activations the SAE reads (the hook point's width, e.g. 768 for ViT-B).
        d_sae: number of latents (dictionary size), usually 8-64 x d_in.
        architecture: ``standard`` (ReLU + L1), ``topk`` (Gao et al.) or ``jumprelu`` (Rajamanoharan et al.).
        k: top-k only: active latents per row.
        aux_k: top-k only: dead latents AuxK uses to model the residual; ``None`` = min(d_in // 2, d_sae)
            (Gao et al. A.2), 0 switches AuxK off.
        aux_k_coefficient: top-k only: weight of the AuxK loss (Gao et al.: 1/32).
        l1_coefficient: standard only: weight of the L1 penalty sum_i f_i * ||W_dec[i]||. 5 suits inputs
            scaled to E||x|| = sqrt(d_in), which ``train_sae`` does (April update).
        l0_coefficient: jumprelu only: weight of the L0 penalty (number of active latents per row).
        jumprelu_bandwidth: jumprelu only: width epsilon of the rectangle kernel of the pseudo-derivatives.
        jumprelu_init_threshold: jumprelu only: initial threshold of every latent.
        apply_b_dec_to_input: subtract b_dec from the input before encoding (SAELens default True).
        normalize_activations: SAELens's input normalisation; only ``none`` (training folds its scale into
            the weights, so saved SAEs take raw activations).
        dtype: dtype of the parameters and of the saved weights: float32, float16 or bfloat16.
        hook_name: the hook point the activations came from (e.g. ``blocks.5.hook_resid_post``).
        model_name: the model the activations came from.
        metadata: more provenance (e.g. ``cls_only``), saved under ``cfg.json``'s ``metadata``.
    """

    d_in: int
    d_sae: int
    architecture: str = "standard"
    k: int = 32
    aux_k: int | None = None
    aux_k_coefficient: float = 1 / 32
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    hook_name: str = ""
    model_name: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"architecture '{self.architecture}' is unknown; use one of {', '.join(ARCHITECTURES)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(f"d_in={self.d_in}, d_sae={self.d_sae}; both must be >= 1 (d_in is the activation "
                           "width, d_sae the number of latents, typically 8-64 x d_in)")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_sae:
            raise SAEError(f"k={self.k} with d_sae={self.d_sae}; top-k needs 1 <= k <= d_sae: lower k or "
                           "raise d_sae")
        if self.aux_k is not None and not 0 <= self.aux_k <= self.d_sae:
            raise SAEError(f"aux_k={self.aux_k}; give 0 <= aux_k <= d_sae={self.d_sae} (0 switches AuxK off)")
        if self.architecture == "jumprelu" and (self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold < 0):
            raise SAEError(f"jumprelu_bandwidth={self.jumprelu_bandwidth}, jumprelu_init_threshold="
                           f"{self.jumprelu_init_threshold}; the bandwidth must be > 0 and the threshold >= 0")
        if min(self.l1_coefficient, self.l0_coefficient, self.aux_k_coefficient) < 0:
            raise SAEError("l1_coefficient, l0_coefficient and aux_k_coefficient must be >= 0; they weight penalties")
        self.dtype = str(self.dtype).removeprefix("torch.")
        if self.dtype not in DTYPES:
            raise SAEError(f"dtype '{self.dtype}' is not supported; use one of {', '.join(DTYPES)}")
        if self.normalize_activations != "none":
            raise SAEError(f"normalize_activations='{self.normalize_activations}' is not supported; use 'none' "
                           "(train_sae folds its input scale into the weights)")

    @property
    def k_aux(self) -> int:
        return min(self.d_in // 2, self.d_sae) if self.aux_k is None else self.aux_k

    def to_saelens_dict(self) -> dict:
        """The ``cfg.json`` dict, in SAELens v6's layout (``SAEConfig.to_dict`` of sae_lens/saes/sae.py)."""
        from ... import __version__

        d = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype,
             "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
             "normalize_activations": self.normalize_activations, "reshape_activations": "none"}
        if self.architecture == "topk":
            d.update(k=self.k, rescale_acts_by_decoder_norm=False)
        details = {name: getattr(self, name) for name in TRAINING_FIELDS[self.architecture]}
        d["metadata"] = {**self.metadata, "model_name": self.model_name, "hook_name": self.hook_name,
                         "sae_lens_version": SAELENS_SCHEMA, "sae_lens_training_version": None,
                         "training_architecture": self.architecture, "training_architecture_details": details,
                         "hf_ext_version": __version__}
        return d

    @classmethod
    def from_saelens_dict(cls, d: dict) -> SAEConfig:
        """Read a SAELens ``cfg.json`` dict (v6, or the flat pre-6 layout)."""
        meta = dict(d.get("metadata") or {})
        arch = d.get("architecture", "standard")
        if "topk" in (d.get("activation_fn"), d.get("activation_fn_str")):  # pre-6 top-k: a "standard" with topk
            arch = "topk"
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "metadata"}
        kw.update(meta.pop("training_architecture_details", None) or {})
        if "k" not in kw and (d.get("activation_fn_kwargs") or {}).get("k") is not None:  # pre-6 top-k
            kw["k"] = d["activation_fn_kwargs"]["k"]
        kw["model_name"] = meta.pop("model_name", None) or d.get("model_name") or ""
        kw["hook_name"] = meta.pop("hook_name", None) or d.get("hook_name") or d.get("hook_point") or ""
        for key in ("sae_lens_version", "sae_lens_training_version", "training_architecture", "hf_ext_version"):
            meta.pop(key, None)
        if d.get("normalize_activations") in (None, False):
            kw["normalize_activations"] = "none"
        if arch not in ARCHITECTURES:
            raise SAEError(f"cfg.json says architecture '{arch}', which hf-ext cannot load; hf-ext loads "
                           f"{', '.join(ARCHITECTURES)} SAEs (load '{arch}' with sae_lens itself)")
        return cls(**{**kw, "architecture": arch, "metadata": meta})


__all__ = ["ARCHITECTURES", "CFG_FILE", "DTYPES", "SAELENS_SCHEMA", "TRAINING_FIELDS", "WEIGHTS_FILE", "SAEConfig",
           "SAEError"]
