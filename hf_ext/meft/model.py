# MEFT: "Make Pre-trained Model Reversible: From Parameter to Memory Efficient Fine-Tuning"
# (Liao, Tan, Monz, NeurIPS 2023), https://arxiv.org/abs/2306.00477
"""``MeftModel``, the PEFT tuner, and ``MeftLayer``, the wrapper of every target transformer layer.

How the stack runs inside an unmodified transformers model: every target layer is wrapped. The HF
layer loop calls the first wrapper with the inputs all layers share (mask, RoPE), and that wrapper
runs the whole reversible stack (``ops.ReversibleStack``) and returns its output; the other wrappers
pass it through. The frozen layers below the stack run as usual and, having nothing trainable under
them, save nothing for backward.
"""
from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from . import ops
from .blocks import ENCODERS, SUPPORTED, blocks_for
from .config import MeftConfig, MeftError, default_scales

PREFIX = "meft_"


class Adapter(nn.Module):
    """down -> act -> dropout -> up, with ``up`` zero-initialised so every adapter starts as 0.

    The weights stay float32 on half-precision models (as peft's LoRA does by default); the input is cast
    to them and the output back to the input's dtype."""

    def __init__(self, hidden: int, dim: int, act: str, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(hidden, dim), nn.Linear(dim, hidden)
        self.act, self.dropout = ACT2FN[act], nn.Dropout(dropout)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):                                                   # (B, T, hidden) -> same
        return self.up(self.dropout(self.act(self.down(x.to(self.down.weight.dtype))))).to(x.dtype)


class MeftLayer(nn.Module, BaseTunerLayer):
    """A target layer: the frozen base layer plus this adapter's modules. ``meft_ffn`` (parallel to the
    FFN, every variant), ``meft_attn`` (after attention, MEFT3) and ``meft_rev`` (the adapter that is a
    whole side of the coupling: G in MEFT1, F in MEFT2)."""

    adapter_layer_names = ("meft_ffn", "meft_attn", "meft_rev")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MeftConfig, hidden: int, blocks):
        super().__init__()
        self.base_layer, self.blocks = base_layer, blocks
        self.meft_ffn, self.meft_attn, self.meft_rev = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.meft_config: dict[str, MeftConfig] = {}
        self.stack: list[MeftLayer] = []      # set on the first layer of the stack only (not submodules)
        self.tuner = None
        self.merged_adapters, self._disable_adapters = [], False
        self.update_layer(adapter_name, config, hidden)

    def update_layer(self, adapter_name, config: MeftConfig, hidden):
        make = lambda: Adapter(hidden, config.adapter_dim, config.adapter_act, config.adapter_dropout)  # noqa: E731
        self.meft_ffn[adapter_name] = make()
        if config.variant == "meft3":
            self.meft_attn[adapter_name] = make()
        else:
            self.meft_rev[adapter_name] = make()
        self.meft_config[adapter_name] = config
        self._active_adapter = adapter_name
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ one coupling of this layer
    def coupling(self, kw) -> ops.Coupling:
        name = self.active_adapters[0]
        cfg, b, layer = self.meft_config[name], self.blocks, self.base_layer
        ffn = self.meft_ffn[name]

        def plm(x):                                                          # the layer, FFN adapter inside
            return b.mlp(layer, b.attention(layer, x, kw), ffn)

        if cfg.variant == "meft1":
            F, G, swap = plm, self.meft_rev[name], True
        elif cfg.variant == "meft2":
            F, G, swap = self.meft_rev[name], plm, True
        else:
            attn = self.meft_attn[name]
            F, G, swap = (lambda x: b.attention(layer, x, kw, attn)), (lambda a: b.mlp(layer, a, ffn)), False
        return ops.Coupling(F, G, cfg.lam, cfg.beta, swap)

    def forward(self, hidden_states, *args, **kwargs):
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        if not self.stack:                   # not the first layer: the first one already ran the stack
            return hidden_states
        return run_stack(self, hidden_states, self.blocks.bind(args, kwargs))


def run_stack(first: MeftLayer, h0, kw):
    """h0 (B, T, hidden) -> the stack's output (B, T, hidden)."""
    cfg = first.meft_config[first.active_adapters[0]]
    training = torch.is_grad_enabled() and first.training
    if training:  # F and G run again in the backward: a KV cache would grow on every call
        kw = {k: v for k, v in kw.items() if k != "cache"}
    couplings = [layer.coupling(kw) for layer in first.stack]
    n_rev = len(couplings) if cfg.num_rev_layers is None else min(cfg.num_rev_layers, len(couplings))
    sdt = getattr(torch, cfg.reconstruction_dtype) if cfg.reconstruction_dtype else h0.dtype
    x1 = x2 = h0.to(sdt)
    tuner = first.tuner
    if training and n_rev:
        params = [p for layer in first.stack[:n_rev] for p in layer.parameters() if p.requires_grad]
        check = tuner is not None and tuner.check_due()
        if check and tuner.first_check:
            tuner.warn_if_unsafe(couplings[:n_rev], x1, h0.dtype)
        x1, x2 = ops.ReversibleStack.apply(x1, x2, couplings[:n_rev], h0.dtype,
                                           tuner.monitor if check else None, *params)
    else:
        x1, x2 = ops.reversible_naive(couplings[:n_rev], x1, x2, h0.dtype)
    x1, x2 = ops.reversible_naive(couplings[n_rev:], x1, x2, h0.dtype)      # ordinary backprop on top
    if cfg.output == "mean":
        out = (x1 + x2) / 2
    else:                 # the PLM path ends in x2 (MEFT1: swapped F output; MEFT3: G output), x1 in MEFT2
        out = x1 if cfg.variant == "meft2" else x2
    return out.to(h0.dtype)


class MeftModel(BaseTuner):
    """The PEFT tuner of MEFT. Use through ``peft.get_peft_model(model, MeftConfig(...))`` after
    ``import hf_ext.meft`` (which registers the ``"MEFT"`` peft type).

    Example:
        >>> import hf_ext.meft
        >>> from peft import get_peft_model
        >>> peft_model = get_peft_model(bert, hf_ext.meft.MeftConfig(variant="meft3", task_type="SEQ_CLS"))  # doctest: +SKIP
        >>> peft_model.save_pretrained("out/adapter")                                                     # doctest: +SKIP
    """

    prefix = PREFIX
    tuner_layer_cls = MeftLayer
    target_module_mapping = {}

    # ------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _prepare_model(self, peft_config: MeftConfig, model: nn.Module):
        base = _base_transformer(model)
        model_type = base.config.model_type
        if model_type not in SUPPORTED:
            raise MeftError(f"model type '{model_type}' is not supported by MEFT; supported: {', '.join(SUPPORTED)}")
        types = set(getattr(base.config, "layer_types", None) or ["full_attention"])
        if len(types) > 1:
            raise MeftError(f"MEFT runs every layer with the inputs of the first; this {model_type} mixes "
                            f"layer types {sorted(types)} (per-layer masks). Use a config with one layer type.")
        layers, rel = blocks_for(model_type).layers(base)
        n = len(layers)
        idx = list(range(n)) if peft_config.target_layers is None else sorted(peft_config.target_layers)
        if not idx or idx[0] < 0 or idx[-1] >= n or idx != list(range(idx[0], idx[-1] + 1)):
            raise MeftError(f"target_layers={peft_config.target_layers}: give contiguous indices in 0..{n - 1}")
        n_rev = len(idx) if peft_config.num_rev_layers is None else min(peft_config.num_rev_layers, len(idx))
        lam, beta = default_scales(peft_config.variant, n_rev, pre_ln=model_type not in ENCODERS)
        peft_config.lam = lam if peft_config.lam is None else float(peft_config.lam)
        peft_config.beta = beta if peft_config.beta is None else float(peft_config.beta)
        prefix = next(name for name, mod in model.named_modules() if mod is layers)
        peft_config.target_modules = rf"^{prefix.replace('.', '[.]')}[.]({'|'.join(map(str, idx))})$"
        self._meft_layers, self._meft_hidden, self._meft_blocks = layers, base.config.hidden_size, blocks_for(model_type)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key):
        if isinstance(target, MeftLayer):
            target.update_layer(adapter_name, peft_config, self._meft_hidden)
            return
        new = MeftLayer(target, adapter_name, peft_config, self._meft_hidden, self._meft_blocks)
        self._replace_module(parent, target_name, new, target)

    def _post_injection_hook(self, model, config, adapter_name):
        stack = [m for m in self._meft_layers if isinstance(m, MeftLayer)]
        for i, layer in enumerate(stack):
            layer.stack = stack if i == 0 else []
            object.__setattr__(layer, "tuner", self)  # a back reference, not a submodule
        self.steps, self.first_check, self.last_recon_error = 0, True, None

    def _mark_only_adapters_as_trainable(self, model):
        for name, p in model.named_parameters():
            if PREFIX not in name:
                p.requires_grad = False

    # ------------------------------------------------------------------------------- monitor
    def check_due(self) -> bool:
        cfg = self.peft_config[self.active_adapters[0]]
        self.steps += 1
        return cfg.check_every > 0 and (self.steps - 1) % cfg.check_every == 0

    def monitor(self, err: float):
        """Called by the reversible backward with the reconstruction error of the first layer's input."""
        cfg = self.peft_config[self.active_adapters[0]]
        self.last_recon_error = err
        if err > cfg.check_threshold:
            msg = (f"MEFT reconstruction error {err:.2e} > {cfg.check_threshold:.0e}: the gradients are not "
                   f"trustworthy. {_safer(cfg)}")
            if cfg.check_action == "raise":
                raise FloatingPointError(msg)
            warnings.warn(msg, stacklevel=2)

    def warn_if_unsafe(self, couplings, x, compute_dtype):
        """Once, at the first training step: the round-trip error of this setting on the real batch."""
        self.first_check = False
        cfg = self.peft_config[self.active_adapters[0]]
        err = ops.reconstruction_error(couplings, x, x, compute_dtype)
        if err > cfg.check_threshold:
            warnings.warn(f"MEFT setting variant={cfg.variant} lam={cfg.lam} beta={cfg.beta} "
                          f"reconstruction_dtype={cfg.reconstruction_dtype} reconstructs the input with "
                          f"relative error {err:.2e} (> {cfg.check_threshold:.0e}). {_safer(cfg)}", stacklevel=3)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise MeftError("MEFT adapters change the network's structure (two streams); they cannot be merged")
        for name, module in list(self.model.named_modules()):
            if isinstance(module, MeftLayer):
                parent = self.model.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[1], module.base_layer)
        return self.model


def _safer(cfg) -> str:
    if cfg.reconstruction_dtype != "float64":
        return "Use reconstruction_dtype='float64', or larger lam/beta (1.0 is the most stable)."
    return "Use larger lam/beta (1.0 is the most stable), or fewer reversible layers (num_rev_layers)."


def _base_transformer(model):
    """The bare transformer (BertModel / LlamaModel) inside a task model."""
    base = getattr(model, "base_model", model)
    for attr in ("bert", "roberta", "model"):
        inner = getattr(base, attr, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "config"):
            return inner
    return base
