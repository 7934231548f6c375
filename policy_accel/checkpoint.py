"""Loading a saved policy: <path>/config.json + <path>/model.safetensors (written by Policy.save).

    policy = pa.load_policy("checkpoints/lift_dp_t", device="cuda", dtype="bfloat16")

Every way a checkpoint can be broken (a file missing, bad JSON, a truncated weight file, weights of
another architecture) is an error naming the file.
"""

import json
from pathlib import Path

import safetensors.torch
import torch

from policy_accel.policy import CONFIG_FILE, WEIGHTS_FILE, Policy, PolicyConfig


def load_policy(path, device: str | torch.device | None = None, dtype=None, **kwargs) -> Policy:
    """Load <path>/{config.json, model.safetensors}; `dtype` runs the denoiser in half precision
    (Policy.set_dtype); kwargs go to Policy (seed)."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {f}")
    try:
        config = PolicyConfig.from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: not a valid policy config: {e}") from None
    data = weights_file.read_bytes()
    try:
        state = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise ValueError(f"{weights_file} is truncated or not a safetensors file: {e}") from None
    policy = Policy(config, **kwargs)
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n")[1:4]).strip()
        raise ValueError(f"{weights_file} does not match {config_file}: {detail}") from None
    if dtype is not None:
        policy.set_dtype(dtype)
    if device is not None:
        policy.to(device)
        policy.seed(policy._seed)
    policy.path = path
    return policy
