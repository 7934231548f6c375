"""Train a DP-T policy on a zarr demo dataset (Diffusion Policy's recipe).

    python eval/train.py env=lift [steps=10000 batch_size=128 model.n_layer=8 ...]   (hydra, configs/train.yaml)
    train(TrainConfig(env="lift", steps=10000))                                         (from Python)

AdamW (lr 1e-4, betas 0.9/0.95, weight decay 1e-3 on Linear weights), cosine schedule with warm-up,
EMA of the weights (power 0.75). Everything goes to `out_dir`:
    last.pt            full training state (policy, EMA, optimiser, LR schedule, step, RNG); rerunning
                       the same command resumes from it, bit-exactly; with a larger `steps=` a
                       finished run goes on, its LR following the longer schedule from where it is
    log.jsonl          one line per `log_every` steps: step, loss, lr, sec_per_step
    checkpoint/        shippable policy (config.json + model.safetensors, EMA weights), every save
At the end the checkpoint is also written to `export_dir` (e.g. checkpoints/lift_dp_t).
`init_from=checkpoints/can_dp_t` starts a new run from a shipped checkpoint's EMA weights and
normalisers (same architecture and data range, else an error); its steps count toward the exported
train_steps and its segments stay in the record. `init_normalizers=dataset` instead fits the normalisers
to this run's dataset (e.g. more demos reaching beyond the checkpoint's ranges) and lets the warm-started
weights adapt to them.

A stop (Ctrl-C, SIGTERM) finishes the current step, saves (state and snapshot) and raises
KeyboardInterrupt, so no finished step is lost.

A run longer than one sitting: `snapshot_dir=checkpoints/can_dp_t/in_training` writes, at every save,
the EMA weights in fp16 there (one file, replaced each time; info.in_training = true) to be
committed; the next sitting warm-starts from it with `init_from=` that folder.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from policy_accel.checkpoint import load_policy
from policy_accel.data import ReplayBuffer, SequenceDataset
from policy_accel.policy import Policy, PolicyConfig
from policy_accel.sampling import SamplerConfig

STATE_FILE, LOG_FILE, CHECKPOINT_DIR = "last.pt", "log.jsonl", "checkpoint"


@dataclass
class TrainConfig:
    env: str = "lift"
    dataset: str = ""  # "": data/<env>.zarr
    out_dir: str = ""  # "": runs/<env>_dp_t
    export_dir: str | None = ""  # "": checkpoints/<env>_dp_t; None: only <out_dir>/checkpoint
    steps: int = 10000
    batch_size: int = 128
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_steps: int = 500
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    save_every: int = 1000
    log_every: int = 50
    num_threads: int = 2
    seed: int = 0
    device: str = "auto"  # auto = cuda if available
    precision: str = "fp32"  # "bf16": forward and loss under bf16 autocast (weights, optimiser, EMA stay fp32)
    progress: bool = True
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    sampler: str = "ddpm"  # the native sampler written into the checkpoint
    sampler_steps: int = 100
    num_train_steps: int = 100
    # warm start: a shipped checkpoint whose EMA weights initialise a new run (fresh optimiser and LR
    # schedule); its training steps are added to this run's in the exported train_steps
    init_from: str | None = None
    init_normalizers: str = "checkpoint"  # with init_from: the checkpoint's normalisers | "dataset": refit here
    snapshot_dir: str | None = None  # also write fp16 EMA weights here at every save (see above)
    # denoiser architecture: fields of the model's config (DPTransformerConfig), e.g. n_layer, n_emb,
    # p_drop_attn; what is not given keeps that config's default. configs/train.yaml spells out the recipe.
    model: dict[str, Any] = field(default_factory=dict)
    model_type: str = "dp_t"  # a registered denoiser family: dp_t | flow_expert | action_dit
    guidance_scale: float | None = None  # classifier-free guidance at sampling (a model with a null condition)

    def __post_init__(self):
        self.dataset = self.dataset or f"data/{self.env}.zarr"
        self.out_dir = self.out_dir or f"runs/{self.env}_dp_t"
        if self.export_dir == "":
            self.export_dir = f"checkpoints/{self.env}_dp_t"
        for name in ("steps", "batch_size", "save_every", "log_every", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.init_normalizers not in ("checkpoint", "dataset"):
            raise ValueError(f"init_normalizers must be 'checkpoint' or 'dataset', got {self.init_normalizers!r}")
        if self.init_normalizers == "dataset" and not self.init_from:
            raise ValueError("init_normalizers=dataset refits a warm start's normalisers: it needs init_from=")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")

    def policy_config(self, obs_dim: int, action_dim: int, info: dict) -> PolicyConfig:
        model = dict(self.model)
        layout = info.get("obs_layout") or []
        if self.model_type != "dp_t" and layout and layout[-1][0] == "instruction":  # its own prefix token
            model.setdefault("instruction_dim", int(layout[-1][1]))
        return PolicyConfig(obs_dim=obs_dim, action_dim=action_dim, horizon=self.horizon,
                            n_obs_steps=self.n_obs_steps, n_action_steps=self.n_action_steps,
                            model=model, model_type=self.model_type, guidance_scale=self.guidance_scale,
                            sampler=SamplerConfig(self.sampler, self.sampler_steps, self.num_train_steps), info=info)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices of training step `step`: epochs of seeded permutations, a function of
    (seed, step) only, so a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _ema(policy: Policy, cfg: TrainConfig):
    from diffusers.training_utils import EMAModel

    return EMAModel(policy.model.parameters(), decay=cfg.ema_max_decay, min_decay=0.0, use_ema_warmup=True,
                    inv_gamma=1.0, power=cfg.ema_power, foreach=True)


def export_checkpoint(policy: Policy, ema, dest, info: dict, half: bool = False) -> Path:
    """Write the shippable checkpoint (EMA weights) without disturbing the training weights."""
    params = list(policy.model.parameters())
    ema.store(params)
    ema.copy_to(params)
    config = policy.config
    policy.config = dataclasses.replace(config, info={**config.info, **info})
    try:
        return policy.save(dest, half=half)
    finally:
        policy.config = config
        ema.restore(params)


# init_from: how far (share of the checkpoint's range) a dataset may reach beyond the checkpoint's normaliser
# ranges, and how much of a range it may leave unused, before it counts as other data
INIT_NORMALIZER_TOLERANCE = 0.02
INIT_UNUSED_RANGE_TOLERANCE = 0.15


def _arch(policy_config: dict) -> dict:
    return {k: v for k, v in policy_config.items() if k != "info"}


def _init_segment(policy: Policy, path: str, policy_config: PolicyConfig, normalizers: str = "checkpoint") -> dict:
    """Load a checkpoint's weights, and its normalisers unless `normalizers="dataset"` keeps those `policy`
    was fit with, into `policy`; return the segment that records where the run started (with the
    checkpoint's own segments as its history)."""
    source = load_policy(path, device="cpu")
    weights = source.model.state_dict()
    if source.config.horizon != policy_config.horizon:
        weights = _shorter_horizon(source, policy_config.horizon, path)
        source.config = dataclasses.replace(source.config, horizon=policy_config.horizon)
    if _arch(source.config.to_dict()) != _arch(policy_config.to_dict()):
        raise ValueError(f"init_from={path}: its config.json describes another policy than this run\n"
                         f" checkpoint: {_arch(source.config.to_dict())}\n run: {_arch(policy_config.to_dict())}")
    kept = ("obs_normalizer", "action_normalizer") if normalizers == "checkpoint" else ()  # "dataset": ours stay
    for name in kept:
        # the weights expect the checkpoint's normalisers; a dataset recollected on another machine may
        # differ a little (MuJoCo: Can's 200 demos, recollected, reached 1.2% beyond one gripper range;
        # Square's left 8.4% of a rotation range unused, its most extreme demo not redrawn)
        ours, theirs = getattr(policy, name), getattr(source, name)
        span = (theirs.max - theirs.min).abs().clamp_min(1e-6)
        beyond = torch.maximum(theirs.min - ours.min, ours.max - theirs.max).clamp_min(0) / span
        unused = torch.maximum(ours.min - theirs.min, theirs.max - ours.max).clamp_min(0) / span
        if beyond.max() > INIT_NORMALIZER_TOLERANCE or unused.max() > INIT_UNUSED_RANGE_TOLERANCE:
            raise ValueError(f"init_from={path}: its {name} differs from this dataset's (the data reaches "
                             f"{beyond.max():.1%} of a range beyond it, leaves {unused.max():.1%} of one unused; "
                             f"tolerated: {INIT_NORMALIZER_TOLERANCE:.0%}, {INIT_UNUSED_RANGE_TOLERANCE:.0%}): "
                             "the checkpoint was trained on other data (init_normalizers=dataset refits them "
                             "to this dataset)")
        ours.load_state_dict(theirs.state_dict())
    policy.model.load_state_dict(weights)
    steps = int(source.config.info.get("train_steps") or 0)
    segment = {"from_step": 0, "steps": 0, "precision": "-", "init_from": str(path), "init_train_steps": steps,
               "history": source.config.info.get("train_segments") or []}
    return segment | ({"normalizers": "refit to the dataset"} if normalizers == "dataset" else {})


def _shorter_horizon(source: Policy, horizon: int, path: str) -> dict:
    """The weights of a causal DP-T for a shorter horizon: its first `horizon` outputs depend only on its
    first `horizon` action tokens (causal self-attention; position-wise cross-attention masks, norms and
    MLPs), so cutting the position embeddings gives the same function on those positions, exactly."""
    if source.config.model_type != "dp_t" or not source.model.config.causal_attn or horizon > source.config.horizon:
        raise ValueError(f"init_from={path}: horizon {source.config.horizon} -> {horizon}: only a causal DP-T "
                         "warm-starts a shorter horizon (its first outputs do not see the later tokens)")
    weights = source.model.state_dict()
    weights["pos_emb"] = weights["pos_emb"][:, :horizon].clone()
    return weights


@contextlib.contextmanager
def _stop_requests():
    """While training: SIGINT / SIGTERM set a flag the loop checks between steps (main thread only)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.signal(sig, lambda *_: flag.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the state we resume from (the run died between log and save)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) according to `cfg`; returns the shippable checkpoint directory."""
    torch.set_num_threads(cfg.num_threads)
    device = _device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = ReplayBuffer.load(cfg.dataset)
    if buffer.attrs.get("env") not in (None, cfg.env):
        raise ValueError(f"dataset {cfg.dataset} was collected on env {buffer.attrs['env']!r}, not {cfg.env!r}")
    dataset = SequenceDataset(buffer, cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps)

    state_path = out / STATE_FILE
    state = torch.load(state_path, map_location="cpu", weights_only=False) if state_path.exists() else None
    info = {"env": cfg.env, "obs_layout": buffer.attrs.get("obs_layout"), "dataset": str(cfg.dataset),
            "n_episodes": buffer.n_episodes, "n_windows": len(dataset), "env_spec": buffer.attrs.get("env_spec"),
            "dataset_command": buffer.attrs.get("command")}
    policy_config = cfg.policy_config(buffer.obs.shape[1], buffer.action.shape[1], info)
    if state is not None and _arch(state["policy_config"]) != _arch(policy_config.to_dict()):
        raise ValueError(f"{state_path} was written for a different policy/dataset config; "
                         f"use another out_dir or delete it\n saved: {state['policy_config']}\n now: "
                         f"{policy_config.to_dict()}")
    torch.manual_seed(cfg.seed)  # weight init; a resumed run restores its RNG state below
    policy = Policy(policy_config)
    policy.fit_normalizers(buffer.obs, buffer.action)
    policy.to(device).train()
    optimizer = torch.optim.AdamW(policy.model.optim_groups(cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                 num_training_steps=cfg.steps)
    init = (_init_segment(policy, cfg.init_from, policy_config, cfg.init_normalizers)
            if state is None and cfg.init_from else None)
    ema = _ema(policy, cfg)
    step = 0
    if state is not None:
        policy.load_state_dict(state["policy"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        _trim_log(out / LOG_FILE, step)
    # what each stretch of the run was trained with (a larger steps=, another precision or other data starts
    # one; segments written before episode counts were recorded are compared on the dataset path alone)
    segments = state.get("segments", []) if state is not None else ([init] if init else [])
    stretch = {"steps": cfg.steps, "precision": cfg.precision, "dataset": str(cfg.dataset),
               "episodes": buffer.n_episodes}
    if not segments or any(segments[-1].get(k, v) != v for k, v in stretch.items()):
        segments.append({"from_step": step, **stretch, "hours": 0.0, "cpu_hours": 0.0})

    def train_info():
        before = segments[0].get("init_train_steps", 0) if segments else 0
        return {"train_steps": before + step, "train_segments": segments}

    def save():
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        _atomic_save({"step": step, "policy": policy.state_dict(), "ema": ema.state_dict(),
                      "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                      "policy_config": policy_config.to_dict(), "train_config": dataclasses.asdict(cfg),
                      "segments": segments, **rng}, state_path)
        if cfg.snapshot_dir:
            export_checkpoint(policy, ema, cfg.snapshot_dir, {**train_info(), "in_training": True}, half=True)
        return export_checkpoint(policy, ema, out / CHECKPOINT_DIR, train_info())

    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc=f"train {cfg.env}", unit="step")
    # wall hours include any time the job sat paused (SIGSTOP); CPU hours (all threads) do not
    running, count, t0, cpu0 = torch.zeros((), device=device), 0, time.perf_counter(), time.process_time()
    with open(out / LOG_FILE, "a") as log, _stop_requests() as stop:
        while step < cfg.steps:
            obs, action = dataset.batch(batch_indices(step, len(dataset), cfg.batch_size, cfg.seed))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = policy.compute_loss(obs.to(device), action.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            ema.step(policy.model.parameters())
            step += 1
            running += loss.detach()
            count += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean = running.item() / count
                if not math.isfinite(mean):
                    raise FloatingPointError(f"training loss is {mean} at step {step}")
                rec = {"step": step, "loss": mean, "lr": lr_scheduler.get_last_lr()[0],
                       "sec_per_step": (time.perf_counter() - t0) / count}
                segments[-1]["hours"] = segments[-1].get("hours", 0.0) + (time.perf_counter() - t0) / 3600
                segments[-1]["cpu_hours"] = segments[-1].get("cpu_hours", 0.0) + (time.process_time() - cpu0) / 3600
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{mean:.4f}")
                running.zero_()
                count, t0, cpu0 = 0, time.perf_counter(), time.process_time()
            if step % cfg.save_every == 0 or step == cfg.steps or stop.is_set():
                save()
            if stop.is_set():
                bar.close()
                raise KeyboardInterrupt(f"training stopped at step {step}; state saved in {state_path}")
    bar.close()
    if not (out / CHECKPOINT_DIR / "model.safetensors").exists():  # resumed a finished run
        save()
    result = out / CHECKPOINT_DIR
    if cfg.export_dir:
        result = export_checkpoint(policy, ema, cfg.export_dir, train_info())
    return result
