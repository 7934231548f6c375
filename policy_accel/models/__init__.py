"""Denoisers, nanoGPT-style: one file per family, built from the residual sub-blocks in blocks.py."""

from policy_accel.models.blocks import CrossAttention, FeedForward, SelfAttention
from policy_accel.models.dp_transformer import ConditionCache, DPTransformer, DPTransformerConfig

__all__ = ["ConditionCache", "CrossAttention", "DPTransformer", "DPTransformerConfig", "FeedForward", "SelfAttention"]
