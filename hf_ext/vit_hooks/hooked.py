"""``HookedVision``: TransformerLens-style hook points on the original timm / transformers model, in place.

Paper: Prisma: An Open Source Toolkit for Mechanistic Interpretability in Vision and Video (2025),
https://arxiv.org/abs/2504.19475. Prisma converts weights into its own ``HookedViT``; we attach PyTorch
hooks to the modules the model already has (see ``families.py``), so every checkpoint works as it is and
no weights are copied. With no hook active the model runs exactly as before.

Hook names: ``hook_embed`` (residual stream entering block 0: patches + prefix tokens + positions),
``blocks.{l}.hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out``,
``blocks.{l}.attn.hook_q|hook_k|hook_v|hook_pattern|hook_z`` and ``hook_final`` (the final norm's output;
CLIP applies it to the pooled token only). A hook is ``fn(activation, hook)``; returning a tensor replaces
the activation (patching, ablation), returning None leaves it.

Example:
    >>> import timm
    >>> from hf_ext.vit_hooks import HookedVision
    >>> hv = HookedVision(timm.create_model("vit_tiny_patch16_224"))
    >>> logits, cache = hv.run_with_cache(images, names_filter=lambda n: n.endswith("resid_post"))
    >>> cache["blocks.3.hook_resid_post"].shape     # (B, 197, 192): CLS + 196 patches
    >>> hv.run_with_hooks(images, fwd_hooks=[("blocks.3.hook_mlp_out", lambda a, hook: a * 0)])
"""
from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .attention import HOOKS_ATTR, NAME
from .families import HookError, find_blocks, find_final

BLOCK_POINTS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
ATTN_POINTS = ("hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z")
_NAME_RE = re.compile(r"blocks\.(\d+)\.(?:attn\.)?(hook_\w+)$")


@dataclass(frozen=True)
class HookPoint:
    """What a hook function receives as ``hook``: the point's name and layer."""

    name: str
    layer: int | None


class ActivationCache(dict):
    """Activations by hook name (TransformerLens' ``ActivationCache`` in spirit): ``cache["hook_final"]``."""

    def stack(self, point: str) -> torch.Tensor:
        """One point of every cached layer, stacked: ``cache.stack("hook_resid_post")`` -> (layers, ...)."""
        keys = sorted((k for k in self if k.endswith("." + point)), key=lambda k: int(k.split(".")[1]))
        return torch.stack([self[k] for k in keys])


class _Stop(Exception):
    def __init__(self, resid):
        self.resid = resid


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _call(fns, t, point):
    for fn in fns:
        out = fn(t, point)
        if out is not None:
            t = out
    return t


class HookedVision:
    """Hook points on a timm or transformers model. See the module docstring.

    Args:
        model: a timm ViT/DeiT/EVA, or a transformers ViT, Dinov2, CLIPVision, SiglipVision, BERT-like or
            Llama-like model (with or without a task head). Weights are used in place.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks_path, self.blocks, self.family = find_blocks(model)
        self.final = find_final(model, self.blocks_path, self.family)
        self.n_layers = len(self.blocks)
        # in the order they are computed, so hooks on one module run in that order too
        attn = tuple(f"attn.{p}" for p in ATTN_POINTS) if self.family.kind != "none" else ()
        per = BLOCK_POINTS[:1] + attn + BLOCK_POINTS[1:]
        self.hook_names = ["hook_embed"] + [f"blocks.{l}.{p}" for l in range(self.n_layers) for p in per]
        if self.final is not None:
            self.hook_names.append("hook_final")
        self._handles: list = []
        self._restore: list = []   # callables that undo attention switches
        self._pre: dict[int, torch.Tensor] = {}
        self._switched = False     # the model runs the hooked attention implementation

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"HookedVision({type(self.model).__name__}, family={self.family.name}, layers={self.n_layers})"

    # ------------------------------------------------------------------------------------------ names
    def check_name(self, name: str) -> str:
        if name not in self.hook_names:
            close = difflib.get_close_matches(name, self.hook_names, n=4, cutoff=0.6)
            raise HookError(f"unknown hook point '{name}' for {self!r}"
                            + (f"; did you mean {', '.join(close)}?" if close else "")
                            + " (`hooked.hook_names` lists all)")
        return name

    def names(self, names_filter=None) -> list[str]:
        """Hook names selected by a name, a list of names, or a predicate (None: all)."""
        if names_filter is None:
            return list(self.hook_names)
        if isinstance(names_filter, str):
            return [self.check_name(names_filter)]
        if callable(names_filter):
            return [n for n in self.hook_names if names_filter(n)]
        return [self.check_name(n) for n in names_filter]

    # ------------------------------------------------------------------------------------------ hooks
    def add_hook(self, name: str, fn) -> None:
        """Attach ``fn(activation, hook) -> tensor | None`` at hook point ``name`` until ``reset_hooks()``."""
        self.check_name(name)
        m = _NAME_RE.match(name)
        layer, point = (int(m.group(1)), m.group(2)) if m else (None, name)
        hp = HookPoint(name, layer)
        fns = [fn]
        if point == "hook_embed":
            self._pre_hook(self.blocks[0], fns, hp)
        elif point == "hook_final":
            self._out_hook(self.final[1], fns, hp)
        elif point == "hook_resid_pre":
            self._pre_hook(self.blocks[layer], fns, hp)
        elif point == "hook_resid_post":
            self._out_hook(self.blocks[layer], fns, hp)
        elif point == "hook_attn_out":
            self._out_hook(self.blocks[layer].get_submodule(self.family.attn_branch), fns, hp)
        elif point == "hook_mlp_out":
            self._out_hook(self.blocks[layer].get_submodule(self.family.mlp_branch), fns, hp)
        elif point == "hook_resid_mid":
            self._mid_hook(layer, fns, hp)
        elif self.family.kind == "hf":
            self._hf_attn_hook(layer, point[5:], fns, hp)
        else:
            self._timm_attn_hook(layer, point[5:], fns, hp)

    def reset_hooks(self) -> None:
        """Remove every hook and undo every attention switch."""
        for h in self._handles:
            h.remove()
        for undo in reversed(self._restore):
            undo()
        self._handles, self._restore = [], []
        self._pre.clear()

    @contextmanager
    def hooks(self, fwd_hooks=()):
        """``with hv.hooks([(name, fn), ...]):`` -- every hook is removed on exit, even on error."""
        try:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn)
            yield self
        finally:
            self.reset_hooks()

    def run_with_hooks(self, *args, fwd_hooks=(), **kwargs):
        """One forward pass with ``fwd_hooks`` (a list of ``(name, fn)``) attached."""
        with self.hooks(fwd_hooks):
            return self.model(*args, **kwargs)

    def run_with_cache(self, *args, names_filter=None, stop_at_layer: int | None = None, **kwargs):
        """``(output, ActivationCache)``. With ``stop_at_layer=l`` the forward stops before block l and the
        output is the residual stream entering it (B, tokens, D)."""
        cache = ActivationCache()
        saves = [(n, lambda t, hook: cache.__setitem__(hook.name, t.detach())) for n in self.names(names_filter)]
        with self.hooks(saves):
            if stop_at_layer is not None:
                if not 0 <= stop_at_layer < self.n_layers:
                    raise HookError(f"stop_at_layer={stop_at_layer}; the model has blocks 0..{self.n_layers - 1}")

                def stop(t, hook):
                    raise _Stop(t)

                self._pre_hook(self.blocks[stop_at_layer], [stop], HookPoint("stop", stop_at_layer))
            try:
                out = self.model(*args, **kwargs)
            except _Stop as s:
                out = s.resid
        return out, cache

    # ---------------------------------------------------------------------------------- mechanics
    def _pre_hook(self, module, fns, hp):
        def pre(mod, args, kwargs):
            if args:
                new = _call(fns, args[0], hp)
                return (new, *args[1:]), kwargs
            new = _call(fns, kwargs["hidden_states"], hp)
            return args, {**kwargs, "hidden_states": new}

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=hp.name == "stop"))

    def _out_hook(self, module, fns, hp):
        self._handles.append(module.register_forward_hook(
            lambda mod, args, out: _replace_first(out, _call(fns, _first(out), hp))))

    def _mid_hook(self, layer, fns, hp):
        block, mid = self.blocks[layer], self.family.mid
        if mid.startswith("module:"):
            return self._out_hook(block.get_submodule(mid[7:]), fns, hp)
        if mid == "norm2":  # read-only: no module whose output could carry a patch
            def read(t, hook):
                if any(fn(t, hook) is not None for fn in fns):
                    raise HookError(f"{hook.name} of {self.family.name} blocks with layer-scale parameters can be "
                                    "read but not patched; patch hook_attn_out instead")
            return self._pre_hook(block.norm2, [read], hp)
        self._pre_hook(block, [lambda t, hook: self._pre.__setitem__(layer, t)], HookPoint("pre", layer))

        def on_branch(mod, args, out):
            pre = self._pre[layer]
            mid_t = pre + _first(out)
            new = _call(fns, mid_t, hp)
            return out if new is mid_t else _replace_first(out, new - pre)

        self._handles.append(block.get_submodule(self.family.attn_branch).register_forward_hook(on_branch))

    def _hf_attn_hook(self, layer, key, fns, hp):
        attn = self.blocks[layer].get_submodule(self.family.attn)
        if not self._switched:
            original = self.model.config._attn_implementation
            self.model.set_attn_implementation(NAME)
            self._switched = True

            def undo():
                self.model.set_attn_implementation(original)
                self._switched = False
                for m in self.model.modules():
                    if hasattr(m, HOOKS_ATTR):
                        delattr(m, HOOKS_ATTR)
            self._restore.append(undo)
        table = getattr(attn, HOOKS_ATTR, None) or {}
        prev = table.get(key)
        table[key] = (lambda t: _call(fns, prev(t) if prev else t, hp))
        setattr(attn, HOOKS_ATTR, table)

    def _timm_attn_hook(self, layer, key, fns, hp):
        attn = self.blocks[layer].get_submodule(self.family.attn)
        H, d = attn.num_heads, attn.head_dim
        if key in ("q", "k", "v"):
            i = "qkv".index(key)

            def on_qkv(mod, args, out):                                          # (B, N, 3*H*d)
                parts = out.unflatten(-1, (3, H, d))                             # (B, N, 3, H, d)
                view = parts[:, :, i]                                            # (B, N, H, d)
                new = _call(fns, view, hp)
                if new is view:
                    return out
                parts = parts.clone()
                parts[:, :, i] = new
                return parts.flatten(-3)
            self._handles.append(attn.qkv.register_forward_hook(on_qkv))
        elif key == "pattern":  # sdpa never forms the pattern: use timm's own unfused path while hooked
            if attn.fused_attn:
                attn.fused_attn = False
                self._restore.append(lambda: setattr(attn, "fused_attn", True))
            self._out_hook(attn.attn_drop, fns, hp)                              # (B, H, N, N)
        else:  # z: the heads' outputs before the (scale norm and) output projection
            def on_z(mod, args):                                                 # (B, N, H*d)
                z = args[0].unflatten(-1, (H, d))
                new = _call(fns, z, hp)
                return None if new is z else (new.flatten(-2), *args[1:])
            self._handles.append(attn.norm.register_forward_pre_hook(on_z))
