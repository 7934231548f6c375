"""The benchmark's side of method strings (the language itself is policy_accel/recipes.py):
apply one to a policy and undo it, and fingerprint the calibrated file it reads."""

import hashlib
from pathlib import Path

import policy_accel as pa
from policy_accel.recipes import Method, parse_method
from policy_accel.sampling import SamplerConfig

__all__ = ["Method", "apply_method", "parse_method", "schedule_digest"]


def schedule_digest(method: Method, checkpoint_dir: str | Path, native: SamplerConfig) -> str | None:
    """sha256 of the schedule (or MagCache ratios) files a method reads; None for methods without one.
    Results made with another file of the same name must not be merged with new ones."""
    paths = [p for p in method.files(checkpoint_dir, native) if p.is_file()]
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest() if paths else None


class _Remover:
    def __init__(self, policy):
        self.policy = policy

    def remove(self):
        pa.remove_acceleration(self.policy)


def apply_method(policy, method: Method, checkpoint_dir: str | Path):
    """Configure `policy` for `method` (after undoing any earlier one); `.remove()` on the result undoes it."""
    pa.remove_acceleration(policy)
    if policy.compiled_model is not None:
        policy.compile(False)
    pa.accelerate(policy, method.spec, checkpoint_dir=checkpoint_dir)
    return _Remover(policy)
