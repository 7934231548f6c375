"""LeRobot checkpoints -> FlowExpert: a rename table, strict about names and shapes.

    cfg = smolvla_config(lerobot_config, vlm_text_config)       # FlowExpertConfig from LeRobot's SmolVLA config
    model = FlowExpert(cfg)
    load_lerobot_expert(model, policy_state_dict)                # SmolVLAPolicy / PI0Policy / PI05Policy keys

Only the action expert and its input/output projections are loaded. The VLM's tensors (and SmolVLA's prefix-side
`state_proj`) belong to the prefix, which is not part of this family: they are skipped by name group. Anything
else is an error, as is a missing or misshaped tensor; the message names the upstream tensor.
"""

import re

import torch

from policy_accel.models.flow_expert import FlowExpert, FlowExpertConfig

# where the expert's transformer lives in each upstream state dict
EXPERT_ROOT = {
    "smolvla": "model.vlm_with_expert.lm_expert.",  # SmolVLMWithExpertModel.lm_expert (a LlamaModel)
    "pi0": "model.paligemma_with_expert.gemma_expert.model.",  # PaliGemmaWithExpertModel.gemma_expert.model
    "pi05": "model.paligemma_with_expert.gemma_expert.model.",
}
# upstream name groups that are skipped on purpose (the VLM and everything else on the prefix side)
SKIPPED = {
    "smolvla": ("model.vlm_with_expert.vlm.", "model.state_proj."),
    "pi0": ("model.paligemma_with_expert.paligemma.", "model.paligemma_with_expert.gemma_expert.lm_head."),
    "pi05": ("model.paligemma_with_expert.paligemma.", "model.paligemma_with_expert.gemma_expert.lm_head.",
             "model.proprio_history_proj."),
}
# ours -> upstream, inside the expert (first match wins); our sub-blocks own their norms
RENAMES = [
    (r"layers\.(\d+)\.attn\.input_layernorm\.(.+)", r"layers.\1.input_layernorm.\2"),
    (r"layers\.(\d+)\.attn\.(.+)", r"layers.\1.self_attn.\2"),
    (r"layers\.(\d+)\.mlp\.post_attention_layernorm\.(.+)", r"layers.\1.post_attention_layernorm.\2"),
    (r"layers\.(\d+)\.mlp\.(.+)", r"layers.\1.mlp.\2"),
    (r"norm\.(.+)", r"norm.\1"),
]


def upstream_name(ours: str, mode: str) -> str:
    """Our parameter name -> the LeRobot state-dict key it is loaded from."""
    for pattern, template in RENAMES:
        if re.fullmatch(pattern, ours):
            return EXPERT_ROOT[mode] + re.sub(pattern, template, ours)
    return "model." + ours  # action_in_proj, action_out_proj, action_time_mlp_*, time_mlp_*, state_proj


def convert_lerobot_expert(model: FlowExpert, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LeRobot policy state dict -> our expert's tensors (every parameter except the built-in prefix encoder)."""
    mode = model.config.mode
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("prefix_encoder.")}
    wanted = {upstream_name(k, mode): k for k in ours}
    out = {}
    for up, name in wanted.items():
        if up not in state_dict:
            raise ValueError(f"state dict lacks {up} (for {name}; mode {mode!r})")
        if tuple(state_dict[up].shape) != tuple(ours[name].shape):
            raise ValueError(f"{up} has shape {tuple(state_dict[up].shape)}; this {mode} config needs "
                             f"{tuple(ours[name].shape)} (for {name})")
        out[name] = state_dict[up]
    for key in state_dict:
        if key in wanted or key.startswith(SKIPPED[mode]) or key.startswith(EXPERT_ROOT[mode] + "rotary_emb."):
            continue
        where = "expert tensor" if key.startswith(EXPERT_ROOT[mode]) else "tensor outside the expert and the VLM"
        raise ValueError(f"unexpected {where} {key}: no counterpart in this {mode} FlowExpert "
                         f"({model.config.n_layer} layers)")
    return out


def load_lerobot_expert(model: FlowExpert, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a LeRobot SmolVLA / π0 / π0.5 policy state dict's expert into `model` (strict, see module doc)."""
    with torch.no_grad():
        params = model.state_dict()
        for name, value in convert_lerobot_expert(model, state_dict).items():
            params[name].copy_(value)


def load_smolvla_expert(model: FlowExpert, state_dict: dict[str, torch.Tensor]) -> None:
    if model.config.mode != "smolvla":
        raise ValueError(f"load_smolvla_expert needs a smolvla FlowExpert, got mode {model.config.mode!r}")
    load_lerobot_expert(model, state_dict)


def get_intermediate_size(hidden: int, ffn_dim_multiplier: int = 4, multiple_of: int = 256) -> int:
    """SmolVLA's expert MLP width (smolvlm_with_expert.py): 4 × (2/3 hidden), rounded up to a multiple of 256."""
    return multiple_of * ((ffn_dim_multiplier * int(2 * hidden / 3) + multiple_of - 1) // multiple_of)


def smolvla_config(lerobot: dict, text: dict, **overrides) -> FlowExpertConfig:
    """FlowExpertConfig from a LeRobot `SmolVLAConfig` dict and its VLM's text config dict."""
    n_vlm = lerobot.get("num_vlm_layers", text["num_hidden_layers"])
    if lerobot.get("num_expert_layers", -1) not in (-1, 0, n_vlm):
        raise ValueError("an expert with fewer layers than the VLM (num_expert_layers) is not supported")
    every = lerobot.get("self_attn_every_n_layers", 2) if "cross" in lerobot.get("attention_mode", "cross_attn") else 1
    width = int(text["hidden_size"] * lerobot.get("expert_width_multiplier", 0.75))
    fields = dict(mode="smolvla", action_dim=lerobot["max_action_dim"], horizon=lerobot["chunk_size"], n_layer=n_vlm,
                  width=width, n_head=text["num_attention_heads"], n_kv_head=text["num_key_value_heads"],
                  head_dim=text["head_dim"], mlp_dim=get_intermediate_size(width), self_attn_every_n_layers=every,
                  min_period=lerobot.get("min_period", 4e-3), max_period=lerobot.get("max_period", 4.0),
                  prefix_width=text["hidden_size"], prefix_mlp_dim=text["intermediate_size"])
    return FlowExpertConfig(**{**fields, **overrides})
