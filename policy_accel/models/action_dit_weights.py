"""GR00T N1.5 weights: LeRobot's `FlowmatchingActionHead.state_dict()` names <-> `ActionDiT` (mode groot_n15).

The mapping is a rename table (shapes and layouts are kept, CategorySpecificLinear `W` stays [E, in, out]):

    model.timestep_encoder.* / model.proj_out_{1,2}.*      -> timestep_encoder.* / proj_out_{1,2}.*
    [model.|vl_self_attention.]transformer_blocks.{i}.norm1.*  -> ....transformer_blocks.{i}.attn.norm1.*
                                ...transformer_blocks.{i}.attn1.*  -> ....transformer_blocks.{i}.attn.*
                                ...transformer_blocks.{i}.norm3.*  -> ....transformer_blocks.{i}.ff.norm3.*
    state_encoder, action_encoder, action_decoder, future_tokens, position_embedding, vlln: unchanged

    load_groot_state_dict(model, torch_or_safetensors_state_dict)   # strict: every upstream tensor, right shapes
"""

import re

import torch

from policy_accel.models.action_dit import ActionDiT

PREFIXES = ("_groot_model.action_head.", "action_head.")  # GrootPolicy / GR00TN15 checkpoints
_BLOCK = r"^((?:vl_self_attention\.)?transformer_blocks\.\d+\.)"


def groot_to_ours(key: str) -> str:
    """One upstream tensor name -> ours."""
    key = key.removeprefix("model.")
    key = re.sub(_BLOCK + r"attn1\.", r"\1attn.", key)
    key = re.sub(_BLOCK + r"norm1\.", r"\1attn.norm1.", key)
    return re.sub(_BLOCK + r"norm3\.", r"\1ff.norm3.", key)


def ours_to_groot(key: str) -> str:
    """One of our tensor names -> upstream's (the inverse of groot_to_ours)."""
    key = re.sub(_BLOCK + r"attn\.norm1\.", r"\1norm1.", key)
    key = re.sub(_BLOCK + r"attn\.", r"\1attn1.", key)
    key = re.sub(_BLOCK + r"ff\.norm3\.", r"\1norm3.", key)
    dit = key.startswith(("transformer_blocks.", "timestep_encoder.", "proj_out_"))
    return "model." + key if dit else key


def load_groot_state_dict(model: ActionDiT, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load an upstream GR00T N1.5 action-head state dict into `model` (mode groot_n15), strictly: every
    upstream tensor must have a counterpart of the same shape and every counterpart must be given. Keys may
    carry an `action_head.` / `_groot_model.action_head.` prefix. Returns our tensors upstream has no
    counterpart for (the flat-observation stand-in `obs_proj`), left as they were."""
    if not isinstance(model, ActionDiT) or model.config.mode != "groot_n15":
        raise ValueError("load_groot_state_dict needs an ActionDiT in mode 'groot_n15'")
    ours = model.state_dict()
    converted = {}
    for key, value in state_dict.items():
        short = next((key.removeprefix(p) for p in PREFIXES if key.startswith(p)), key)
        name = groot_to_ours(short)
        if name not in ours:
            raise ValueError(f"upstream tensor {key!r} (ours: {name!r}) has no counterpart in this model: "
                             "not a GR00T N1.5 action head, or a different configuration")
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ValueError(f"upstream tensor {key!r} has shape {tuple(value.shape)}, this model's {name!r} has "
                             f"{tuple(ours[name].shape)}")
        if name in converted:
            raise ValueError(f"upstream tensor {key!r} given twice (with and without a prefix)")
        converted[name] = value
    stand_ins = [n for n in ours if n.startswith("obs_proj.")]
    missing = sorted(set(ours) - set(converted) - set(stand_ins))
    if missing:
        raise ValueError(f"upstream state dict lacks {len(missing)} tensors, first {ours_to_groot(missing[0])!r} "
                         f"(ours: {missing[0]!r})")
    model.load_state_dict({**{n: ours[n] for n in stand_ins}, **converted}, strict=True)
    return stand_ins


def groot_state_dict(model: ActionDiT) -> dict[str, torch.Tensor]:
    """`model`'s weights under upstream names (without the stand-in `obs_proj`)."""
    return {ours_to_groot(k): v for k, v in model.state_dict().items() if not k.startswith("obs_proj.")}
