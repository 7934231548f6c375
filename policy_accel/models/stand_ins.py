"""Stand-ins for the vision-language model of a VLA, used only when a policy feeds plain observation histories
(B, n_obs_steps, obs_dim) instead of what the real VLM would produce.

and, for profiling at real size with random weights, a prefix / condition of the upstream length.

    flow experts (SmolVLA / π0 / π0.5): PrefixEncoder, one token per obs step through n_layer layers of the
        VLM's text-transformer shape (prefix_width, prefix_mlp_dim), keeping each layer's K/V = a Prefix;
        with `instruction_dim`, the instruction embedding at the end of the obs gets a token of its own, first:
        [instruction ; state_1 .. state_To]
    action DiTs: action_dit_inputs, `obs_proj` (a Linear owned by the model) maps each obs step to one VL token
        (GR00T N1.5; the latest observation is also the state; with `instruction_dim`, `instruction_proj` adds
        the instruction's own VL token first, and the VL self-attention runs over [instruction ; states]) or
        the flattened history, instruction included, to the cognition feature (CogACT)
"""

import torch
import torch.nn as nn

from policy_accel.models.flow_expert import FlowExpertConfig, Layer, Prefix, collect_kv
from policy_accel.models.flow_expert_io import rope_table


def random_prefix(cfg: FlowExpertConfig, batch: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Prefix:
    """A prefix of the upstream length (cfg.prefix_len) with N(0, 1) K/V, all valid (π0: and a state)."""
    randn = lambda *shape: torch.randn(shape, generator=generator).to(device)  # noqa: E731
    kv = [(randn(batch, cfg.n_kv_head, cfg.prefix_len, cfg.head_dim),
           randn(batch, cfg.n_kv_head, cfg.prefix_len, cfg.head_dim)) for _ in range(cfg.n_layer)]
    state = randn(batch, cfg.state_dim) if cfg.state_dim else None
    return Prefix(kv, torch.ones(batch, cfg.prefix_len, dtype=torch.bool, device=device), state)


class PrefixEncoder(nn.Module):
    """Stand-in VLM of a flow expert: obs (B, To, obs_dim) -> Linear -> n_layer pre-norm layers with
    bidirectional attention at RoPE positions 0..To-1 -> a Prefix of To tokens (π0: the latest obs is the state)."""

    def __init__(self, cfg: FlowExpertConfig):
        super().__init__()
        style = "llama" if cfg.mode == "smolvla" else "gemma"
        self.cfg = cfg
        self.embed = nn.Linear(cfg.obs_dim - cfg.instruction_dim, cfg.prefix_width)
        if cfg.instruction_dim:
            self.instruction_proj = nn.Linear(cfg.instruction_dim, cfg.prefix_width)
        self.layers = nn.ModuleList(Layer(cfg, cfg.prefix_width, cfg.prefix_mlp_dim, style) for _ in range(cfg.n_layer))

    def forward(self, obs: torch.Tensor) -> Prefix:
        cfg = self.cfg
        if obs.ndim != 3 or obs.shape[1:] != (cfg.n_obs_steps, cfg.obs_dim):
            raise ValueError(f"obs condition must be (B, {cfg.n_obs_steps}, {cfg.obs_dim}), got {tuple(obs.shape)}")
        state, instruction = split_instruction(obs, cfg.instruction_dim)
        tokens = self.embed(state)  # (B, To, W)
        if instruction is not None:
            tokens = torch.cat([self.instruction_proj(instruction)[:, None], tokens], dim=1)  # (B, 1 + To, W)
        B, L = tokens.shape[:2]
        rope = rope_table(torch.arange(L, device=obs.device)[None], cfg.head_dim, cfg.rope_max_wavelength)
        kv = collect_kv(self.layers, tokens, rope, None)
        return Prefix(kv, torch.ones(B, L, dtype=torch.bool, device=obs.device),
                      state[:, -1] if cfg.mode == "pi0" else None)


def split_instruction(obs: torch.Tensor, instruction_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """obs (B, To, state + instruction) -> states (B, To, state), the latest instruction (B, instruction) or None."""
    if not instruction_dim:
        return obs, None
    return obs[..., :-instruction_dim], obs[:, -1, -instruction_dim:]


def action_dit_inputs(model, obs: torch.Tensor) -> dict:
    """An action DiT's upstream inputs from an obs history (B, n_obs_steps, obs_dim), through `model.obs_proj`."""
    cfg = model.config
    if not cfg.obs_dim:
        names = ("backbone_features", "state", "embodiment_id") if model.groot else ("cognition_features",)
        raise ValueError(f"this action DiT has no observation projection (obs_dim=0): pass a mapping with {names}")
    if obs.ndim != 3 or obs.shape[1:] != (cfg.n_obs_steps, cfg.obs_dim):
        raise ValueError(f"cond must be (B, {cfg.n_obs_steps}, {cfg.obs_dim}), got {tuple(obs.shape)}")
    if not model.groot:
        return {"cognition_features": model.obs_proj(obs.flatten(1))[:, None]}
    state, instruction = split_instruction(obs, cfg.instruction_dim)
    vl = model.obs_proj(state)  # (B, To, D)
    if instruction is not None:
        vl = torch.cat([model.instruction_proj(instruction)[:, None], vl], dim=1)  # (B, 1 + To, D)
    return {"backbone_features": vl, "state": state[:, -1:],
            "embodiment_id": torch.zeros(len(obs), dtype=torch.long, device=obs.device)}
