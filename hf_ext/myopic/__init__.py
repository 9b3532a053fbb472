"""Myopic training (Wu, Morris & Levine 2024): a ``"myopic"`` attention implementation for any
transformers model on the AttentionInterface, its naive reference, and the myopia-gap measurement.

Importing this module registers ``attn_implementation="myopic"``.
"""
from .attention import MyopicError, count_myopic_calls, enable_myopic, myopic_attention_forward
from .ops import myopic_attention, myopic_grads_naive

__all__ = ["count_myopic_calls", "enable_myopic", "myopic_attention", "myopic_attention_forward",
           "myopic_grads_naive", "MyopicError"]
