"""Read-ME: dense LLM -> router-decoupled MoE, with a lookahead expert cache (in progress).

Paper: https://arxiv.org/abs/2410.19123. ``extract``: expert masks from activation sparsity; ``policy``:
LRU / Belady expert-cache simulation on routing traces.
"""
from .extract import ExpertMasks, MoEError, activation_stats, expert_masks
from .policy import hits, optimal_hits_brute_force

__all__ = ["ExpertMasks", "MoEError", "activation_stats", "expert_masks", "hits", "optimal_hits_brute_force"]
