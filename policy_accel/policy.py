"""A diffusion policy around a denoiser: normalise -> observation history -> condition -> sample ->
unnormalise -> action queue (LeRobot-style, with Diffusion Policy's timing).

    policy = pa.load_policy("checkpoints/lift_dp_t")
    policy.reset()                          # new episode
    action = policy.select_action(obs)      # (obs_dim,) -> (Da,), or (B, obs_dim) -> (B, Da)
    chunk = policy.predict_action_chunk(obs)  # (B, n_action_steps, Da), always recomputes

The history holds the last n_obs_steps observations (right after reset() the first one fills it by
repetition). A predicted chunk spans `horizon` steps starting at the oldest observation in the
history; the n_action_steps executed ones start at index n_obs_steps - 1 (the current step).

Per chunk: `ctx = model.prepare(cond, timesteps)` (the Denoiser seam, policy_accel/denoiser.py),
then `sample(model, ctx, noise, sampler, clock=self.clock)`. A cache attaches to `model` and
listens to `clock` (`pa.accelerate(policy, config)` sets `policy.cache`). A cache whose decisions
are taken over the whole batch (`batch_coupled`, e.g. skip if the batch's mean change is small)
makes each row be sampled on its own, as a batch-1 deployment would.

Deployment knobs: `policy.set_dtype(torch.bfloat16)` (or `load_policy(..., dtype=)`, `policy.to(dtype=)`)
runs the denoiser in half precision behind an fp32 boundary; `policy.compile_chunk()` compiles the whole
chunk into one graph (policy_accel/chunk_graph.py); policy_accel/async_policy.py runs it beside the robot.
"""

import dataclasses
import hashlib
import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from policy_accel.cache.schedule import Binding
from policy_accel.clock import StepClock
from policy_accel.models import family
from policy_accel.normalizer import MinMaxNormalizer
from policy_accel.precision import HalfPrecisionDenoiser, parse_dtype
from policy_accel.sampling import Guidance, SamplerConfig, build_sampler, ddpm_scheduler, sample

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class PolicyConfig:
    obs_dim: int
    action_dim: int
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    model_type: str = "dp_t"
    model: dict = field(default_factory=dict)  # denoiser architecture (e.g. n_layer, n_emb, p_drop_attn)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the native sampler
    guidance_scale: float | None = None  # classifier-free guidance (a denoiser trained with condition dropout)
    info: dict = field(default_factory=dict)  # free-form: env, obs_layout, dataset, training steps...

    def __post_init__(self):
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig(**self.sampler)
        for name in ("obs_dim", "action_dim", "horizon", "n_obs_steps", "n_action_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"PolicyConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(f"n_obs_steps - 1 + n_action_steps = {self.n_obs_steps - 1 + self.n_action_steps} "
                             f"exceeds horizon {self.horizon}")
        self.model_config()  # validates the model type and its architecture fields

    def model_config(self):
        """The denoiser family's config for these observation / action sizes and the `model` fields."""
        return family(self.model_type).config_for(obs_dim=self.obs_dim, action_dim=self.action_dim,
                                                  horizon=self.horizon, n_obs_steps=self.n_obs_steps, arch=self.model)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "sampler": self.sampler.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown policy config keys {sorted(unknown)}")
        return cls(**d)


class Policy(nn.Module):
    def __init__(self, config: PolicyConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.model = family(config.model_type)(config.model_config())
        self.obs_normalizer = MinMaxNormalizer(config.obs_dim)
        self.action_normalizer = MinMaxNormalizer(config.action_dim)
        self.noise_scheduler = ddpm_scheduler(config.sampler.num_train_steps)  # training noise (add_noise)
        self.clock = StepClock()  # driven by the sampling loop; caches listen to it
        self.cache = None  # the handle pa.accelerate attached
        self.recipe = None  # what pa.accelerate(policy, "<method string>") changed (sampler, compile)
        self.path: Path | None = None  # the checkpoint folder it was loaded from (load_policy)
        self.compiled_model = None  # set by compile()
        self.chunk_graph = None  # set by compile_chunk()
        self.dtype = torch.float32  # the denoiser's weights and activations (set_dtype)
        self._reuse_noise = False
        self._episode_noise: torch.Tensor | None = None
        self._fp32_hash: str | None = None  # checkpoint_hash from before a cast to half precision
        self.set_sampler(config.sampler)
        self.seed(seed)
        self._history: deque[np.ndarray] = deque(maxlen=config.n_obs_steps)
        self._actions: deque[np.ndarray] = deque()
        self.eval()

    # ---------------------------------------------------------------- configuration
    def set_sampler(self, sampler: SamplerConfig) -> None:
        """Switch the sampler (e.g. DDPM-100 -> DDIM-10) at eval time; it must fit what the model predicts."""
        if not isinstance(sampler, SamplerConfig):
            raise TypeError(f"set_sampler takes a SamplerConfig, got {type(sampler).__name__}")
        native = self.config.sampler
        sampler.check_fits(self.model.prediction)
        if sampler.num_train_steps != native.num_train_steps:
            raise ValueError(f"sampler num_train_steps={sampler.num_train_steps} but the model was trained with "
                             f"{native.num_train_steps}")
        self.sampler = sampler
        self._sampler = build_sampler(sampler)

    @property
    def timesteps(self):
        """The sampler's timesteps, as each chunk's `model.prepare(cond, timesteps)` receives them."""
        return self._sampler.timesteps

    def compile(self, enabled: bool = True, **compile_kwargs) -> None:
        """torch.compile the whole denoiser for sampling (one graph: t goes in as a tensor).
        With acceleration, use the method config's `compile=True` instead, which compiles each
        block's computation and leaves the cache logic in Python."""
        if enabled and self.cache is not None:
            raise RuntimeError("the policy is accelerated: compile through the method config (compile=True)")
        if enabled and self.chunk_graph is not None:
            raise RuntimeError("the whole chunk is compiled (compile_chunk()): call policy.compile_chunk(False) first")
        self.compiled_model = torch.compile(self.model, **compile_kwargs) if enabled else None

    def compile_chunk(self, enabled: bool = True, cuda_graph: bool = False, **compile_kwargs):
        """Compile the whole chunk, as the policy is now (cache, sampler, dtype), into one graph:
        torch.compile(fullgraph=True) of normalise -> prepare -> all denoising steps -> unnormalise.
        `cuda_graph=True` (CUDA only) also captures it as one CUDA graph per batch size. Change the
        method, sampler or dtype and compile again. See policy_accel/chunk_graph.py."""
        if not enabled:
            self.chunk_graph = None
            return None
        if self.compiled_model is not None:
            raise RuntimeError("the denoiser alone is compiled (policy.compile()): call policy.compile(False) first")
        from policy_accel.chunk_graph import ChunkGraph

        self.chunk_graph = ChunkGraph(self, cuda_graph=cuda_graph, **compile_kwargs)
        return self.chunk_graph

    def set_dtype(self, dtype) -> None:
        """Run the denoiser in half precision: its weights and activations in `dtype` (torch.bfloat16 or
        torch.float16; names such as "bf16" work too). Kept in fp32: the normalisers, the initial and
        per-step noise, the sampler's state x and its update (coefficients up to ~1/sqrt(alpha_bar), large
        at the noisy end, cancel in x0 = a * x - b * eps), and DP-T's sinusoidal time embedding. The
        prediction comes back as fp32; actions are fp32. One way: a cast policy cannot return to fp32 exactly
        (load it again). checkpoint_hash stays the fp32 file's, so calibrated schedules still bind."""
        dtype = parse_dtype(dtype)
        if dtype == self.dtype:
            return
        if self.dtype != torch.float32:
            raise ValueError(f"the policy is {self.dtype} already; casting to {dtype} would not restore its fp32 "
                             "weights: load the checkpoint again")
        if self.chunk_graph is not None or self.compiled_model is not None:
            raise RuntimeError("the policy is compiled: set the dtype first, then compile")
        self._fp32_hash = self.checkpoint_hash
        self.model.to(dtype)
        self.dtype = dtype

    def to(self, *args, **kwargs):
        """nn.Module.to, except that a dtype goes to set_dtype (the normalisers stay fp32)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self.set_dtype(dtype)
        return super().to(device=device, non_blocking=non_blocking) if device is not None else self

    @property
    def episode_noise(self) -> bool:
        """True: one initial noise draw per episode, reused by every chunk (cross-chunk reuse turns it on)."""
        return self._reuse_noise

    @episode_noise.setter
    def episode_noise(self, on: bool) -> None:
        self._reuse_noise, self._episode_noise = bool(on), None  # a draw from before must not be reused

    def seed(self, seed: int) -> None:
        """Reseed the noise generator (on the policy's device): same seed -> same actions."""
        self._seed = int(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self._seed)

    def binding(self) -> Binding:
        """What a cache attached now is for: these weights and the current sampler."""
        return Binding(self.checkpoint_hash, self.sampler.kind, self.sampler.num_steps)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def fit_normalizers(self, obs: np.ndarray, action: np.ndarray) -> None:
        self.obs_normalizer.fit(obs)
        self.action_normalizer.fit(action)

    # ---------------------------------------------------------------- acting
    def reset(self) -> None:
        """New episode: clears the observation history, the action queue and the cache's state."""
        self._history.clear()
        self._actions.clear()
        self._episode_noise = None
        self.clock.reset()

    def select_action(self, obs, done: np.ndarray | None = None) -> np.ndarray:
        """One env observation (obs_dim,) -> one action (Da,); a batch (B, obs_dim) -> (B, Da).
        `done` (B,) bool marks rows whose episode is over: a new chunk is not computed for them
        (zeros instead), and the other rows get the actions they would get without it."""
        batch, single = self._check_obs(obs)
        if done is not None and np.shape(done) != (len(batch),):
            raise ValueError(f"done must have shape ({len(batch)},), got {np.shape(done)}")
        self._push(batch)
        if not self._actions:
            active = None if done is None else ~np.asarray(done, dtype=bool)
            chunk = self._predict(np.stack(self._history, axis=1), active=active)  # (B, Ta, Da)
            self._actions.extend(chunk.transpose(1, 0, 2))
        action = self._actions.popleft()
        return action[0] if single else action

    def predict_action_chunk(self, obs, noise: torch.Tensor | None = None, step_noise: list | None = None
                             ) -> np.ndarray:
        """The next n_action_steps actions (B, Ta, Da), always recomputed. `obs` (obs_dim,) or
        (B, obs_dim) is appended to the history as in select_action; (B, n_obs_steps, obs_dim) is
        used as the whole history and leaves the stored one alone. The action queue is untouched.
        `noise` (B, horizon, Da) replaces the initial noise drawn from the policy's generator, and
        `step_noise` (a stochastic sampler's per-step noise, as `Sampler.draw_step_noise` makes it)
        the noise drawn at each step: the same chunk on another device or dtype."""
        arr = _as_array(obs)
        if arr.ndim == 3:
            history = self._check_obs(arr, history=True)[0]
        else:
            self._push(self._check_obs(arr)[0])
            history = np.stack(self._history, axis=1)
        if step_noise is not None:
            if noise is None:
                raise ValueError("step_noise needs the initial noise too")
            if len(step_noise) != self.sampler.num_steps:
                raise ValueError(f"step_noise must hold {self.sampler.num_steps} entries, got {len(step_noise)}")
            step_noise = [n if n is None else n.to(device=self.device, dtype=torch.float32) for n in step_noise]
        return self._predict(history, noise, step_noise)

    def _check_obs(self, obs, history: bool = False) -> tuple[np.ndarray, bool]:
        arr = _as_array(obs)
        D, To = self.config.obs_dim, self.config.n_obs_steps
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"obs must hold real numbers, got dtype {arr.dtype}")
        if history:
            if arr.shape[1:] != (To, D) or len(arr) == 0:
                raise ValueError(f"obs history must have shape (B, {To}, {D}), got {arr.shape}")
        elif not ((arr.ndim == 1 and arr.shape == (D,)) or (arr.ndim == 2 and arr.shape[1] == D and len(arr))):
            raise ValueError(f"obs must have shape ({D},) or (B, {D}), got {arr.shape}")
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.argwhere(~finite)[0].tolist()
            raise ValueError(f"obs contains NaN or inf (first at index {bad})")
        return np.array(np.atleast_2d(arr), dtype=np.float32), arr.ndim == 1  # a copy: envs may reuse buffers

    def _push(self, batch: np.ndarray) -> None:
        if self._history and len(self._history[-1]) != len(batch):
            raise ValueError(f"batch size changed from {len(self._history[-1])} to {len(batch)} within an episode; "
                             "call reset() first")
        if not self._history:
            self._history.extend([batch] * self.config.n_obs_steps)
        else:
            self._history.append(batch)

    @torch.inference_mode()
    def _predict(self, history: np.ndarray, noise: torch.Tensor | None = None,
                 step_noise: list | None = None, active: np.ndarray | None = None) -> np.ndarray:
        """history (B, To, obs_dim) raw -> executable actions (B, Ta, Da) raw; rows not `active` are zeros."""
        cfg, device = self.config, self.device
        if self.generator.device != device:  # the policy was moved since seed()
            self.seed(self._seed)
        B = len(history)
        shape = (B, cfg.horizon, cfg.action_dim)
        if noise is None and self.episode_noise and self._episode_noise is not None \
                and tuple(self._episode_noise.shape) == shape:
            noise = self._episode_noise
        elif noise is None:
            noise = torch.randn(shape, generator=self.generator, device=device)
            self._episode_noise = noise if self.episode_noise else None
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        else:
            noise = noise.to(device=device, dtype=torch.float32)
        if self.chunk_graph is not None:  # every row (one graph per batch size); rows not active: zeros
            if step_noise is None:
                step_noise = self._sampler.draw_step_noise(noise, self.generator)
            out = self.chunk_graph(torch.from_numpy(history).to(device), noise, step_noise).cpu().numpy()
            if active is not None:
                out[~active] = 0.0
            return out
        coupled = B > 1 and self.cache is not None and self.cache.batch_coupled
        if coupled or (active is not None and not active.all()):
            # some rows, or each row on its own, with the noise the whole batch would have drawn
            step_noise = self._sampler.draw_step_noise(noise, self.generator)
            rows = np.flatnonzero(active) if active is not None else np.arange(B)
            groups = [rows[i:i + 1] for i in range(len(rows))] if coupled else [rows] if len(rows) else []
            out = np.zeros((B, cfg.n_action_steps, cfg.action_dim), dtype=np.float32)
            for g in groups:
                idx = torch.as_tensor(g, device=device)
                out[g] = self._predict(history[g], noise[idx], [n if n is None else n[idx] for n in step_noise])
            return out

        return self._chunk(torch.from_numpy(history).to(device), noise, step_noise).cpu().numpy()

    def _chunk(self, history: torch.Tensor, noise: torch.Tensor, step_noise: list | None = None) -> torch.Tensor:
        """One chunk on tensors: raw history (B, To, obs_dim) -> raw executable actions (B, Ta, Da), fp32.
        All of it is traced into one graph by compile_chunk (policy_accel/chunk_graph.py)."""
        cfg = self.config
        cond = self.obs_normalizer.normalize(history)
        ctx = self.model.prepare(cond.to(self.dtype), self._sampler.timesteps)  # once per chunk, exact
        model = self.model if self.compiled_model is None else self.compiled_model
        if self.dtype != torch.float32:
            model = HalfPrecisionDenoiser(model, self.dtype)
        guidance = None if cfg.guidance_scale is None else Guidance(cfg.guidance_scale)
        x = sample(model, ctx, noise, self._sampler, clock=self.clock, guidance=guidance, generator=self.generator,
                   step_noise=step_noise)
        start = cfg.n_obs_steps - 1
        return self.action_normalizer.unnormalize(x[:, start:start + cfg.n_action_steps])

    # ---------------------------------------------------------------- training
    def compute_loss(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Denoising loss on raw data, for what the model predicts: obs (B, >= To, obs_dim), action
        (B, horizon, Da). epsilon / sample: DDPM noising at a random train step, target the noise / x0;
        velocity: flow matching, x_t = t * noise + (1 - t) * x0 with t ~ U(0, 1), target noise - x0."""
        cond = self.obs_normalizer.normalize(obs[:, :self.config.n_obs_steps])
        x0 = self.action_normalizer.normalize(action)
        noise = torch.randn_like(x0)
        if self.model.prediction == "velocity":
            t = torch.rand(x0.shape[0], device=x0.device)
            noisy, target = t[:, None, None] * noise + (1 - t[:, None, None]) * x0, noise - x0
        else:
            t = torch.randint(0, self.config.sampler.num_train_steps, (x0.shape[0],), device=x0.device)
            noisy = self.noise_scheduler.add_noise(x0, noise, t)
            target = noise if self.model.prediction == "epsilon" else x0
        return F.mse_loss(self.model(noisy, t, self.model.prepare(cond)), target)

    # ---------------------------------------------------------------- checkpoints
    def _weights_bytes(self, half: bool = False) -> bytes:
        """The state dict as safetensors; half=True stores the denoiser's float weights as fp16 (the
        normalisers stay fp32). Loading casts them back to the policy's dtype."""
        def value(k, v):
            v = v.detach().cpu().contiguous()
            return v.half() if half and k.startswith("model.") and v.is_floating_point() else v

        return safetensors.torch.save({k: value(k, v) for k, v in self.state_dict().items()})

    @property
    def checkpoint_hash(self) -> str:
        """sha256 of the (fp32) model.safetensors this policy saves to (= of the fp32 file it was loaded from;
        for a policy cast to half precision, of its fp32 weights before the cast)."""
        if self._fp32_hash is not None:
            return self._fp32_hash
        return hashlib.sha256(self._weights_bytes()).hexdigest()

    def save(self, path, half: bool = False) -> Path:
        """Write <path>/config.json and <path>/model.safetensors (weights + normalisers; half=True:
        fp16 denoiser weights, half the size, e.g. for an intermediate weight file of a long run)."""
        if self.dtype != torch.float32:
            raise ValueError(f"the policy runs in {self.dtype} (set_dtype): save the fp32 policy it was cast from")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / WEIGHTS_FILE, self._weights_bytes(half))
        _atomic_write(path / CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2).encode())
        return path


def _as_array(obs) -> np.ndarray:
    if isinstance(obs, torch.Tensor):
        obs = obs.detach().cpu().numpy()
    try:
        return np.asarray(obs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"obs is not an array: {e}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
