"""Denoisers, nanoGPT-style: one file per family, built from the residual sub-blocks in blocks.py.

A family is an nn.Module class with `config_for(obs_dim, action_dim, horizon, n_obs_steps, arch)`
returning its config, a constructor taking that config, and the Denoiser seam (policy_accel/denoiser.py).
`FAMILIES` maps the `model_type` a checkpoint names to its class.
"""

from policy_accel.models.blocks import CrossAttention, FeedForward, SelfAttention, family_config
from policy_accel.models.dp_transformer import ConditionCache, DPTransformer, DPTransformerConfig

FAMILIES = {"dp_t": DPTransformer}


def register_family(name: str):
    """Class decorator: make a denoiser family loadable as `model_type=name`."""

    def decorator(cls):
        FAMILIES[name] = cls
        return cls

    return decorator


def family(model_type: str):
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "ConditionCache", "CrossAttention", "DPTransformer", "DPTransformerConfig", "FeedForward",
           "SelfAttention", "family", "family_config", "register_family"]

# families that register themselves (after register_family exists: they import it from here)
from policy_accel.models import action_dit, flow_expert  # noqa: E402, F401
