"""Pre-gated MoE causal LM (Read-ME): a dense decoder with sliced MLP experts and a decoupled router.

Paper: Read-ME, Cai et al., NeurIPS 2024, https://arxiv.org/abs/2410.19123.

The router is a small causal transformer over token ids; it picks one expert per token, used in every
layer, so ``model.route(input_ids)`` knows the experts of queued tokens before the backbone runs (what the
lookahead expert cache and the expert-aware batcher need). Each MLP is a shared expert plus D routed
experts, all slices of the dense MLP's neurons. The backbone is the dense architecture itself, rebuilt from
``config.base_config``. This file imports only torch and transformers, so a checkpoint saved with
``auto_map`` loads with ``trust_remote_code=True`` where hf-ext is not installed.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pregated_moe import PreGatedMoEConfig


class PreGatedMoEMLP(nn.Module):
    """Shared expert (S neurons) + D routed experts (K neurons each); ``expert_ids`` (B, T) set per call."""

    def __init__(self, hidden: int, shared: int, experts: int, expert_size: int, act: nn.Module, gated: bool,
                 bias: bool = False):
        super().__init__()
        self.gated, self.act = gated, act
        n_in = 2 if gated else 1                                                         # gate and up, or fc1
        self.shared_in = nn.Parameter(torch.empty(n_in, shared, hidden))                 # (2|1, S, H)
        self.shared_out = nn.Parameter(torch.empty(hidden, shared))                      # (H, S)
        self.routed_in = nn.Parameter(torch.empty(experts, n_in, expert_size, hidden))   # (D, 2|1, K, H)
        self.routed_out = nn.Parameter(torch.empty(experts, hidden, expert_size))        # (D, H, K)
        self.shared_in_bias = nn.Parameter(torch.zeros(shared)) if bias else None
        self.routed_in_bias = nn.Parameter(torch.zeros(experts, expert_size)) if bias else None
        self.out_bias = nn.Parameter(torch.zeros(hidden)) if bias else None
        self.expert_ids: torch.Tensor | None = None
        self.num_routed = experts
        self.expert_source = None       # d -> (w_in, w_out, b_in): an offloading cache (hf_ext.moe.cache)

    def routed_weights(self, d: int):
        """(w_in (2|1, K, H), w_out (H, K), b_in (K,) or None) of routed expert d."""
        if self.expert_source is not None:
            return self.expert_source(d)
        return self.routed_in[d], self.routed_out[d], None if self.routed_in_bias is None else self.routed_in_bias[d]

    def expert(self, x, w_in, w_out, b_in=None):
        """One expert on tokens x (..., H): down(act(gate x) * up x), or down(act(fc1 x))."""
        h = x @ w_in[0].T if b_in is None else x @ w_in[0].T + b_in
        h = self.act(h) * (x @ w_in[1].T) if self.gated else self.act(h)
        return h @ w_out.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expert(x, self.shared_in, self.shared_out, self.shared_in_bias)         # (B, T, H)
        if self.expert_source is not None or self.routed_in.shape[2]:
            if self.expert_ids is None or self.expert_ids.shape != x.shape[:-1]:
                raise ValueError("PreGatedMoEMLP needs expert_ids (B, T) for this call; run the model, which routes")
            flat, ids = x.reshape(-1, x.shape[-1]), self.expert_ids.reshape(-1)           # (BT, H), (BT,)
            routed = torch.zeros_like(flat)
            for d in ids.unique().tolist():
                sel = (ids == d).nonzero().flatten()
                routed.index_add_(0, sel, self.expert(flat[sel], *self.routed_weights(d)))
            y = y + routed.view_as(y)
        return y if self.out_bias is None else y + self.out_bias


class PreGatingRouter(nn.Module):
    """A small causal transformer over token ids: (B, T) -> expert logits (B, T, D)."""

    def __init__(self, config: PreGatedMoEConfig):
        super().__init__()
        d = config.router_hidden
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.router_max_positions, d)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d, config.router_heads, 4 * d, dropout=0.0,
                                                                batch_first=True, norm_first=True)
                                     for _ in range(config.router_layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.num_experts)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) expert logits. With ``attention_mask`` (B, T) (left padding in batched
        generation), pads are invisible and positions count real tokens, so routing matches each sequence
        alone."""
        B, T = input_ids.shape
        if T > self.pos.num_embeddings:
            raise ValueError(f"the router reads at most {self.pos.num_embeddings} tokens; got {T}")
        dev = input_ids.device
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=dev)                  # (T, T)
        if attention_mask is None or bool(attention_mask.all()):
            pos, mask = torch.arange(T, device=dev), causal
        else:
            real = attention_mask.bool()
            pos = (real.long().cumsum(-1) - 1).clamp(min=0)                                    # (B, T)
            seen = real[:, None, :] | torch.eye(T, dtype=torch.bool, device=dev)              # a pad sees itself
            mask = causal.masked_fill(~seen, float("-inf"))                                   # (B, T, T)
            mask = mask.repeat_interleave(self.layers[0].self_attn.num_heads, 0)               # (B*heads, T, T)
        h = self.embed(input_ids) + self.pos(pos)
        for layer in self.layers:
            h = layer(h, src_mask=mask.to(h.dtype), is_causal=mask is causal)
        return self.head(self.norm(h))


class PreGatedMoEPreTrainedModel(PreTrainedModel):
    config_class = PreGatedMoEConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _no_split_modules = ["PreGatedMoEMLP"]

    def _init_weights(self, module):
        std = getattr(self.config.base_config, "initializer_range", 0.02)
        if isinstance(module, PreGatedMoEMLP):
            for p in (module.shared_in, module.shared_out, module.routed_in, module.routed_out):
                init.normal_(p, mean=0.0, std=std)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 1:
            init.ones_(module.weight)                                                    # RMSNorm


class PreGatedMoEForCausalLM(PreGatedMoEPreTrainedModel, GenerationMixin):
    """A pre-gated MoE causal LM. Convert a dense model with ``hf_ext.moe.convert_to_pregated_moe``.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("out/smollm2-moe", trust_remote_code=True)  # doctest: +SKIP
        >>> model.route(input_ids)          # (B, T) expert of every token, before the backbone runs  # doctest: +SKIP
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PreGatedMoEConfig):
        super().__init__(config)
        base = config.base_config
        inner = AutoModelForCausalLM.from_config(base)
        self.model, self.lm_head = inner.model, inner.lm_head
        act = ACT2FN[base.hidden_act]
        for layer, s, k in zip(self.model.layers, config.shared_sizes, config.expert_sizes):
            layer.mlp = PreGatedMoEMLP(base.hidden_size, s, config.num_experts, k, act, config.gated_mlp, config.mlp_bias)
        self.router = PreGatingRouter(config)
        self.post_init()

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The expert (B, T) of every token, from token ids alone (and the padding mask, if any)."""
        return self.router(input_ids, attention_mask).argmax(-1)

    def set_expert_ids(self, expert_ids: torch.Tensor) -> None:
        for layer in self.model.layers:
            layer.mlp.expert_ids = expert_ids

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, expert_ids=None, router_input_ids=None,
                past_key_values=None, **kwargs):
        if expert_ids is None:
            ids = router_input_ids if router_input_ids is not None else input_ids
            if ids is None:
                raise ValueError("the pre-gating router reads token ids: pass input_ids (or expert_ids)")
            n = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            mask = attention_mask if attention_mask is not None and attention_mask.shape == ids.shape else None
            expert_ids = self.router(ids, mask).argmax(-1)[:, -n:]
        self.set_expert_ids(expert_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["router_input_ids"] = input_ids            # the router reads the whole prefix, not just new tokens
        return inputs
