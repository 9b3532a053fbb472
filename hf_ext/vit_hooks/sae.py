"""Sparse autoencoders (SAEs) over cached activations, saved in SAELens's on-disk layout.

Papers:
- ``standard``: ReLU + L1 penalty. Bricken et al. 2023, "Towards Monosemanticity",
  https://transformer-circuits.pub/2023/monosemantic-features ; L1 weighted by decoder row norms from
  Conerly et al., "Circuits Updates - April 2024", https://transformer-circuits.pub/2024/april-update
- ``topk``: keep the k largest pre-activations, then ReLU; AuxK revives dead latents. Gao et al. 2024,
  "Scaling and evaluating sparse autoencoders", https://arxiv.org/abs/2406.04093
- ``jumprelu``: JumpReLU with a learned threshold, trained with straight-through estimators (rectangle
  kernel) and an L0 penalty. Rajamanoharan et al. 2024, "Jumping Ahead", https://arxiv.org/abs/2407.14435

All three share ``h = (x - b_dec) @ W_enc + b_enc`` (``f = act(h)``, ``x_hat = f @ W_dec + b_dec``), with
SAELens's parameter names and shapes, so ``save_pretrained`` writes ``cfg.json`` + ``sae_weights.safetensors``
that ``sae_lens.SAE.load_from_disk`` reads (schema of sae_lens/saes/sae.py, v6).

Example:
    >>> from hf_ext.vit_hooks.sae import SAEConfig, SparseAutoencoder
    >>> sae = SparseAutoencoder(SAEConfig(d_in=768, d_sae=8192, architecture="topk", k=32))
    >>> sae.encode(torch.randn(4, 768)).shape
    torch.Size([4, 8192])
    >>> sae.save_pretrained("sae-vit-b-blocks.5")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..errors import HfExtError, OutputExistsError

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
        from .. import __version__

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


def rectangle(x: torch.Tensor) -> torch.Tensor:
    """The kernel K(x) = 1{-1/2 < x < 1/2} of the JumpReLU paper's pseudo-derivatives."""
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """z * H(z - theta). d/dz = H(z - theta); d/dtheta = -(theta/eps) K((z - theta)/eps) (paper eq. 11)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        d_theta = -(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * g
        return (z > theta).to(g.dtype) * g, d_theta.reshape(-1, z.shape[-1]).sum(0), None


class Step(torch.autograd.Function):
    """H(z - theta), for the L0 penalty. d/dz = 0; d/dtheta = -(1/eps) K((z - theta)/eps) (paper eq. 12)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        d_theta = -(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * g
        return None, d_theta.reshape(-1, z.shape[-1]).sum(0), None


def geometric_median(x: torch.Tensor, iters: int = 200, eps: float = 1e-8, tol: float = 1e-9) -> torch.Tensor:
    """argmin_y sum_i ||x_i - y||_2 by Weiszfeld's iteration, in float64. x: (N, d) -> (d,), x's dtype.

    Unlike the mean, it moves little when a few rows are outliers, which makes it a good b_dec (Bricken et al.).
    """
    xs = x.detach().double().reshape(-1, x.shape[-1])  # (N, d)
    y = xs.mean(0)                                      # (d,)
    for _ in range(iters):
        w = 1.0 / (xs - y).norm(dim=1).clamp_min(eps)   # (N,) inverse distances
        y_new = (w[:, None] * xs).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * max(1.0, float(y.norm()))
        y = y_new
        if done:
            break
    return y.to(x.dtype)


def geometric_median_naive(x: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """Reference: minimise the definition sum_i ||x_i - y|| with a generic optimiser (L-BFGS, float64)."""
    xs = x.detach().double()
    y = xs.mean(0).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([y], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = sum(torch.linalg.vector_norm(row - y) for row in xs)
        loss.backward()
        return loss

    opt.step(objective)
    return y.detach().to(x.dtype)


class SparseAutoencoder(nn.Module):
    """An SAE: ``f = act((x - b_dec) @ W_enc + b_enc)``, ``x_hat = f @ W_dec + b_dec``.

    Parameters (SAELens names): W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,), and
    for jumprelu ``threshold`` (d_sae,). Init: unit-norm decoder rows, W_enc = W_dec.T, b_enc = 0 (Gao et al.).

    Example:
        >>> sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=128, architecture="jumprelu"))
        >>> out = sae.forward_with_loss(torch.randn(8, 32)); sorted(out)
        ['aux', 'feature_acts', 'loss', 'mse', 'sparsity', 'x_hat']
    """

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        W_dec = torch.randn(config.d_sae, config.d_in)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)               # (d_sae, d_in), unit rows
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())                    # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))          # (d_sae,)
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))           # (d_in,)
        if config.architecture == "jumprelu":
            # threshold itself, not log(threshold): under Adam a log parameter moves ~threshold * lr per step
            # and a small init never moves (SAELens issue #494); relu() keeps it >= 0
            self.threshold = nn.Parameter(torch.full((config.d_sae,), config.jumprelu_init_threshold))
        self.to(DTYPES[config.dtype])

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """h = (x - b_dec) @ W_enc + b_enc: (..., d_in) -> (..., d_sae)."""
        x = x.to(self.W_enc.dtype)
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """Feature activations from pre-activations: (..., d_sae) -> (..., d_sae), sparse."""
        cfg = self.config
        if cfg.architecture == "standard":
            return torch.relu(h)
        if cfg.architecture == "topk":
            values, idx = h.topk(cfg.k, dim=-1, sorted=False)        # (..., k)
            return torch.zeros_like(h).scatter(-1, idx, values.relu())
        return JumpReLU.apply(h, self.threshold.relu(), cfg.jumprelu_bandwidth)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) feature activations."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) -> (..., d_in) reconstruction."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, *, with_loss: bool = False, dead_mask: torch.Tensor | None = None,
                sparsity_scale: float = 1.0):
        """x_hat (..., d_in); with ``with_loss=True`` the dict of ``forward_with_loss`` (one forward, so
        DDP under accelerate sees the training pass)."""
        h = self.pre_acts(x)                                          # (B, d_sae)
        f = self.activate(h)                                          # (B, d_sae)
        x_hat = self.decode(f)                                        # (B, d_in)
        if not with_loss:
            return x_hat
        cfg = self.config
        mse = (x_hat - x.to(x_hat.dtype)).pow(2).sum(-1).mean()      # summed over d_in, as in the papers
        if cfg.architecture == "standard":  # L1 weighted by decoder norms (April update)
            sparsity, coef = (f * self.W_dec.norm(dim=1)).sum(-1).mean(), cfg.l1_coefficient
        elif cfg.architecture == "jumprelu":  # L0 through the Step straight-through estimator
            sparsity = Step.apply(h, self.threshold.relu(), cfg.jumprelu_bandwidth).sum(-1).mean()
            coef = cfg.l0_coefficient
        else:  # top-k: sparsity is fixed by k, so the L0 is only reported
            sparsity, coef = (f > 0).sum(-1).to(h.dtype).mean(), 0.0
        aux = self._aux_k(x.to(x_hat.dtype) - x_hat, h, dead_mask)
        loss = mse + sparsity_scale * coef * sparsity + cfg.aux_k_coefficient * aux
        return {"loss": loss, "mse": mse, "sparsity": sparsity, "aux": aux, "feature_acts": f, "x_hat": x_hat}

    def forward_with_loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                          sparsity_scale: float = 1.0) -> dict:
        """dict(loss, mse, sparsity, aux, feature_acts, x_hat); ``dead_mask`` (d_sae,) bool feeds AuxK."""
        return self(x, with_loss=True, dead_mask=dead_mask, sparsity_scale=sparsity_scale)

    def _aux_k(self, err: torch.Tensor, h: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        """Gao et al. AuxK: the top-k_aux dead latents reconstruct the residual err = x - x_hat."""
        k = min(self.config.k_aux, int(dead.sum())) if dead is not None else 0
        if self.config.architecture != "topk" or k == 0:
            return h.new_zeros(())
        values, idx = h.masked_fill(~dead, -math.inf).topk(k, dim=-1)     # (B, k)
        e_hat = torch.zeros_like(h).scatter(-1, idx, values.relu()) @ self.W_dec  # (B, d_in), no bias
        return (e_hat - err.detach()).pow(2).sum(-1).mean()

    @torch.no_grad()
    def init_b_dec_geometric_median(self, sample: torch.Tensor) -> None:
        """b_dec = geometric median of ``sample`` (N, d_in) (Bricken et al.; Gao et al.'s b_pre)."""
        self.b_dec.copy_(geometric_median(sample.to(self.b_dec.device)).to(self.b_dec.dtype))

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` take raw ``x``; latents are unchanged, outputs come back unscaled."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (Bricken et al.; Gao et al.; Gemma Scope)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False, **_) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) atomically: temp folder, then rename."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise OutputExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) or "
                                    "choose a new folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(self.state_tensors(), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CFG_FILE).write_text(json.dumps(self.config.to_saelens_dict(), indent=2))
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype: str | None = None) -> SparseAutoencoder:
        """Load a folder written by ``save_pretrained`` or by SAELens (standard / topk / jumprelu)."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (CFG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise SAEError(f"{path} has no {name}; point at a folder written by save_pretrained or SAELens "
                               f"(it holds {CFG_FILE} and {WEIGHTS_FILE})")
        d = json.loads((path / CFG_FILE).read_text())
        if dtype is not None:
            d["dtype"] = dtype
        try:
            config = SAEConfig.from_saelens_dict(d)
        except TypeError as e:
            raise SAEError(f"{path / CFG_FILE} is not an SAE config ({e}); re-save the SAE") from e
        weights = load_file(path / WEIGHTS_FILE)
        if "log_threshold" in weights and "threshold" not in weights:  # older SAELens JumpReLU checkpoints
            weights["threshold"] = weights.pop("log_threshold").exp()
        sae = cls(config)
        want = {n: p.shape for n, p in sae.named_parameters()}
        missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
        if missing or extra:
            raise SAEError(f"{path / WEIGHTS_FILE} has keys {sorted(weights)}; a '{config.architecture}' SAE needs "
                           f"{sorted(want)} (missing {missing}, unexpected {extra}). The file is incomplete or "
                           f"cfg.json names the wrong architecture; re-save the SAE")
        for n, t in weights.items():
            if t.shape != want[n]:
                raise SAEError(f"{path / WEIGHTS_FILE}: {n} has shape {tuple(t.shape)}, cfg.json (d_in="
                               f"{config.d_in}, d_sae={config.d_sae}) needs {tuple(want[n])}; re-save the SAE")
        sae.load_state_dict({n: t.to(DTYPES[config.dtype]) for n, t in weights.items()})
        return sae.to(device) if device is not None else sae

    def extra_repr(self) -> str:
        c = self.config
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}" + (f", k={c.k}" if c.architecture == "topk" else "")


__all__ = ["ARCHITECTURES", "SAEConfig", "SAEError", "SparseAutoencoder", "geometric_median",
           "geometric_median_naive"]
