"""``TemporalFeatureCache``: every temporal feature of a denoiser, precomputed per sampler step, as a lookup.

Paper: TFMQ-DM (https://arxiv.org/abs/2311.16503), "cache-based maintenance": a sampler visits a finite set
of time steps, so the Temporal Information Block (``tib.py``) can be evaluated once per step offline and
looked up at run time. The table is keyed by the scheduler (class + config) and the step count, so a
table built for one schedule is never silently used with another.

At run time a diffusers ``ModelHook`` on the model reads the call's ``timestep`` (and ``class_labels``)
and maps it to table rows; a hook on each temporal module returns those rows instead of running it, so the
time-embedding MLPs and the per-block modulation projections leave the hot path.

Exactness: a cached feature is the bits the model computed for that step when the table was built, in one
batch of at least 16 rows. The uncached model computes the same feature in the denoiser's batch, and a BLAS
may sum a batch of another size in another order, so cached and uncached samples agree to float32 rounding
(a few ulps; tests bound it), not always bit for bit: they did on this machine's default MKL path for 16+
rows, and not under ``MKL_CBWR=COMPATIBLE``.

Example:
    >>> from diffusers import DDIMScheduler
    >>> from hf_ext.temporal import apply_temporal_cache
    >>> cache = apply_temporal_cache(transformer, DDIMScheduler(), num_inference_steps=25)  # doctest: +SKIP
    >>> cache.save("dit-tfmq/")  # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from .tib import TIB, TemporalError, find_tib, tib_outputs

CACHE_FILE = "temporal_cache.safetensors"
INDEX_HOOK, LOOKUP_HOOK = "hf_ext_temporal_index", "hf_ext_temporal_lookup"
MIN_ROWS = 16


def schedule_key(scheduler, num_inference_steps: int) -> dict:
    """What a table is valid for: the scheduler class, its config, and the number of steps."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"scheduler": type(scheduler).__name__, "config": json.loads(json.dumps(config, default=str)),
            "num_inference_steps": int(num_inference_steps)}


def schedule_timesteps(scheduler, num_inference_steps: int) -> torch.Tensor:
    fresh = type(scheduler).from_config(scheduler.config)   # set_timesteps mutates; leave the caller's alone
    fresh.set_timesteps(num_inference_steps)
    return fresh.timesteps.clone()


class TemporalFeatureCache:
    """Outputs of every temporal module for each (step[, label]); ``tables[name]``: (S * L, ...) rows."""

    def __init__(self, tib: TIB, timesteps: torch.Tensor, labels: torch.Tensor | None, tables: dict, key: dict):
        self.tib, self.timesteps, self.labels, self.tables, self.key = tib, timesteps, labels, tables, key
        self.rows: torch.Tensor | None = None          # this call's table rows (set by the index hook)

    @classmethod
    @torch.no_grad()
    def build(cls, model, scheduler, num_inference_steps: int, labels=None) -> "TemporalFeatureCache":
        """Evaluate the TIB of ``model`` at every time step of ``scheduler`` (and every class label of a DiT,
        or only ``labels``; the CFG null label is always included)."""
        tib = find_tib(model)
        ts = schedule_timesteps(scheduler, num_inference_steps)
        device = next(model.parameters()).device
        lab = None
        if tib.num_labels:
            null = tib.num_labels - 1
            lab = torch.arange(tib.num_labels) if labels is None else torch.tensor(sorted({*map(int, labels), null}))
            if lab.max() > null or lab.min() < 0:
                raise TemporalError(f"labels must lie in [0, {null}] for this model")
        L = len(lab) if lab is not None else 1
        t_all = ts.repeat_interleave(L).to(device)                                # (S * L,)
        y_all = lab.repeat(len(ts)).to(device) if lab is not None else None      # (S * L,)
        n = len(t_all)
        if n < MIN_ROWS:                                                          # see "Bit-identity" above
            reps = -(-MIN_ROWS // n)
            t_all, y_all = t_all.repeat(reps), (y_all.repeat(reps) if y_all is not None else None)
        outs = tib_outputs(model, tib, t_all, y_all)
        tables = {k: (tuple(x[:n].clone() for x in v) if isinstance(v, tuple) else v[:n].clone()) for k, v in outs.items()}
        return cls(tib, ts, lab, tables, schedule_key(scheduler, num_inference_steps))

    def check(self, scheduler, num_inference_steps: int) -> None:
        """A ``TemporalError`` unless this table was built for ``scheduler`` with ``num_inference_steps``."""
        want = schedule_key(scheduler, num_inference_steps)
        if want != self.key:
            diff = [k for k in ("scheduler", "num_inference_steps") if want[k] != self.key[k]] or ["config"]
            raise TemporalError(f"the temporal cache was built for {self.key['scheduler']} with "
                                f"{self.key['num_inference_steps']} steps, not {want['scheduler']} with "
                                f"{want['num_inference_steps']} (differs in {', '.join(diff)}); rebuild it with "
                                "apply_temporal_cache(model, scheduler, num_inference_steps)")

    def index(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Table rows (B,) for time steps ``t`` (B,) and labels (B,)."""
        hit = t.double()[:, None] == self.timesteps.to(t.device).double()[None, :]   # (B, S)
        if not hit.any(1).all():
            bad = t[~hit.any(1)][0].item()
            raise TemporalError(f"time step {bad} is not in the temporal cache (built for {self.key['scheduler']} with "
                                f"{self.key['num_inference_steps']} steps); rebuild it for this schedule")
        step = hit.float().argmax(1)
        if self.labels is None:
            return step
        if labels is None:
            raise TemporalError("this DiT's temporal cache is keyed by class label; pass class_labels")
        lab = self.labels.to(labels.device)
        match = labels.long()[:, None] == lab[None, :]
        if not match.any(1).all():
            raise TemporalError(f"class label {labels[~match.any(1)][0].item()} is not in the temporal cache; build it "
                                "with labels=None (all classes) or include this label")
        return step * len(lab) + match.float().argmax(1)

    def lookup(self, name: str):
        table = self.tables[name]
        if isinstance(table, tuple):
            return tuple(x.index_select(0, self.rows) for x in table)
        return table.index_select(0, self.rows)

    # ---- disk -------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        tensors = {"timesteps": self.timesteps.contiguous()}
        if self.labels is not None:
            tensors["labels"] = self.labels.contiguous()
        tuples = [k for k, v in self.tables.items() if isinstance(v, tuple)]
        for k, v in self.tables.items():
            for i, x in enumerate(v if isinstance(v, tuple) else (v,)):
                tensors[f"table.{k}#{i}"] = x.contiguous().cpu()
        meta = {"family": self.tib.family, "modules": self.tib.modules, "num_labels": self.tib.num_labels,
                "time_emb_projs": self.tib.time_emb_projs, "tuples": tuples, "key": self.key}
        path = Path(folder) / CACHE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, tmp, metadata={"hf_ext_temporal": json.dumps(meta), "format": "pt"})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TemporalFeatureCache":
        from safetensors import safe_open

        path = Path(folder) / CACHE_FILE
        if not path.is_file():
            raise TemporalError(f"{folder} has no {CACHE_FILE}; build one with apply_temporal_cache(...).save(folder) "
                                "or `hf-ext convert tfmq`")
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("hf_ext_temporal", "null") or "null")
            if meta is None:
                raise TemporalError(f"{path} was not written by hf-ext (no temporal metadata); rebuild it")
            tib = TIB(meta["family"], meta["modules"], meta["num_labels"], meta["time_emb_projs"])
            tables = {}
            for k in tib.modules:
                parts = tuple(f.get_tensor(f"table.{k}#{i}") for i in range(2 if k in meta["tuples"] else 1))
                tables[k] = parts if k in meta["tuples"] else parts[0]
            labels = f.get_tensor("labels") if "labels" in f.keys() else None
            return cls(tib, f.get_tensor("timesteps"), labels, tables, meta["key"])


class _IndexHook(ModelHook):
    """On the model: map this call's (timestep, class_labels) to table rows before anything runs."""

    def __init__(self, cache: TemporalFeatureCache, signature: inspect.Signature):
        super().__init__()
        self.cache, self.signature = cache, signature

    def pre_forward(self, module, *args, **kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        x = next(iter(bound.values()))                                  # hidden_states / sample
        t = bound.get("timestep")
        if t is None:
            raise TemporalError("the temporal cache needs the call's timestep; pass timestep=...")
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        self.cache.rows = self.cache.index(t, bound.get("class_labels"))
        return args, kwargs


class _LookupHook(ModelHook):
    def __init__(self, cache: TemporalFeatureCache, name: str):
        super().__init__()
        self.cache, self.name = cache, name

    def new_forward(self, module, *args, **kwargs):
        return self.cache.lookup(self.name)


def apply_temporal_cache(model, scheduler=None, num_inference_steps: int | None = None,
                         cache: TemporalFeatureCache | None = None, labels=None,
                         modules: list[str] | None = None) -> TemporalFeatureCache:
    """Replace the temporal modules of ``model`` by a lookup table for this schedule; returns the table.

    Give ``scheduler`` and ``num_inference_steps`` to build the table, or a saved ``cache`` (checked against
    them when they are given too). ``modules`` serves only those temporal modules from the table (default:
    all). ``remove_temporal_cache(model)`` restores the model.
    """
    if getattr(model, "_hf_ext_temporal", None) is not None:
        raise TemporalError("a temporal cache is already applied; remove_temporal_cache(model) first")
    if cache is None:
        if scheduler is None or num_inference_steps is None:
            raise TemporalError("pass scheduler= and num_inference_steps= (to build the table) or cache=")
        cache = TemporalFeatureCache.build(model, scheduler, num_inference_steps, labels)
    elif scheduler is not None:
        cache.check(scheduler, num_inference_steps if num_inference_steps is not None else -1)
    tib = find_tib(model)
    if tib.modules != cache.tib.modules:
        raise TemporalError("this temporal cache was built for another model (its modules differ); rebuild it")
    device = next(model.parameters()).device
    cache.tables = {k: (tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device))
                    for k, v in cache.tables.items()}
    unknown = set(modules or ()) - set(tib.modules)
    if unknown:
        raise TemporalError(f"{sorted(unknown)[0]} is not a temporal module of this model; choose from find_tib(model).modules")
    mods = dict(model.named_modules())
    HookRegistry.check_if_exists_or_initialize(model).register_hook(
        _IndexHook(cache, inspect.signature(model.forward)), INDEX_HOOK)
    for name in modules or tib.modules:
        HookRegistry.check_if_exists_or_initialize(mods[name]).register_hook(_LookupHook(cache, name), LOOKUP_HOOK)
    model._hf_ext_temporal = cache
    return cache


def remove_temporal_cache(model) -> None:
    """Detach the temporal cache; the model computes its temporal features again."""
    if getattr(model, "_hf_ext_temporal", None) is None:
        return
    HookRegistry.check_if_exists_or_initialize(model).remove_hook(INDEX_HOOK, recurse=False)
    for m in model.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and reg.get_hook(LOOKUP_HOOK) is not None:
            reg.remove_hook(LOOKUP_HOOK, recurse=False)
    model._hf_ext_temporal = None
