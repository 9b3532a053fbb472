"""Configuration of the hf-ext pre-gated MoE causal LM (model_type ``hfext_pregated_moe``)."""
from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig


class PreGatedMoEConfig(PreTrainedConfig):
    r"""A dense decoder (Llama, Qwen2, Mistral, ...) whose MLPs are split into a shared and routed experts,
    with a pre-gating router over token ids (Read-ME, https://arxiv.org/abs/2410.19123).

    Args:
        base_config (`dict` or `PreTrainedConfig`): the dense model's config; its architecture is rebuilt
            with ``AutoModelForCausalLM.from_config`` and every MLP replaced.
        num_experts (`int`): D, routed experts per layer (each token uses one, the same in every layer).
        shared_sizes (`list[int]`): neurons of the shared expert of each layer.
        expert_sizes (`list[int]`): neurons of each routed expert of each layer.
        gated_mlp (`bool`): the MLP is gate/up/down (Llama) rather than fc1/fc2.
        mlp_bias (`bool`): the MLP's linears have biases.
        router_hidden, router_layers, router_heads (`int`): the causal transformer router's width, depth, heads.
        router_max_positions (`int`): the longest sequence the router reads.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = PreGatedMoEConfig(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                         num_attention_heads=4, vocab_size=128), num_experts=4,
        ...                         shared_sizes=[8, 8], expert_sizes=[24, 24])
        >>> cfg.active_mlp_fraction
        0.5
    """

    model_type = "hfext_pregated_moe"
    sub_configs = {"base_config": AutoConfig}

    def __init__(self, base_config=None, num_experts=8, shared_sizes=None, expert_sizes=None, gated_mlp=True,
                 mlp_bias=False, router_hidden=128, router_layers=1, router_heads=4, router_max_positions=2048,
                 **kwargs):
        from transformers import CONFIG_MAPPING

        if isinstance(base_config, dict):
            base_config = CONFIG_MAPPING[base_config["model_type"]](**base_config)
        elif base_config is None:
            base_config = CONFIG_MAPPING["llama"]()
        self.base_config = base_config
        self.num_experts = num_experts
        n = base_config.num_hidden_layers
        self.shared_sizes = list(shared_sizes) if shared_sizes is not None else [0] * n
        self.expert_sizes = list(expert_sizes) if expert_sizes is not None else [base_config.intermediate_size // num_experts] * n
        self.gated_mlp, self.mlp_bias = gated_mlp, mlp_bias
        self.router_hidden, self.router_layers, self.router_heads = router_hidden, router_layers, router_heads
        self.router_max_positions = router_max_positions
        kwargs.setdefault("tie_word_embeddings", getattr(base_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.base_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.base_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.base_config.num_hidden_layers

    @property
    def active_mlp_fraction(self) -> float:
        """Neurons a token uses (shared + one expert) over the dense MLP's, averaged over layers."""
        inter = self.base_config.intermediate_size
        return sum(s + k for s, k in zip(self.shared_sizes, self.expert_sizes)) / (inter * len(self.shared_sizes))
