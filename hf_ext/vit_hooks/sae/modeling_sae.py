"""``SparseAutoencoder``: sparse autoencoders (SAEs) over cached activations, saved in SAELens's on-disk layout.

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
from pathlib import Path

import torch
from torch import nn

from ...errors import OutputExistsError
from .configuration_sae import CFG_FILE, DTYPES, WEIGHTS_FILE, SAEConfig, SAEError
from .ops import JumpReLU, Step, geometric_median


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


__all__ = ["SparseAutoencoder"]
