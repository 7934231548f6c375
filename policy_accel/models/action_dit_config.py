"""ActionDiTConfig: the sizes and switches of policy_accel/models/action_dit.py, with the real-size
constructors and where each number comes from."""

from dataclasses import dataclass

from policy_accel.models.blocks import check_positive

MODES = ("groot_n15", "cogact")


@dataclass
class ActionDiTConfig:
    action_dim: int
    mode: str = "groot_n15"  # "groot_n15" (velocity, flow) | "cogact" (epsilon, DDIM + guidance)
    horizon: int = 16  # action chunk
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 16  # width C = num_heads * head_dim
    ff_mult: int = 4
    dropout: float = 0.0  # branch-output dropout (GR00T upstream: 0.2; CogACT: 0)
    obs_dim: int = 0  # > 0: flat observations (B, n_obs_steps, obs_dim) through `obs_proj` (models/stand_ins.py)
    n_obs_steps: int = 1
    instruction_dim: int = 0  # > 0: the last instruction_dim obs dims are an instruction embedding (GR00T: own token)
    # GR00T N1.5
    cross_attention_dim: int = 64  # VL token width (backbone_embedding_dim)
    hidden_size: int = 64  # DiT output_dim = state-encoder / action-decoder hidden width
    state_dim: int = 0  # max_state_dim
    num_embodiments: int = 1
    num_future_tokens: int = 8  # num_target_vision_tokens
    max_seq_len: int = 32  # rows of the action position table
    vl_layers: int = 1  # vl_self_attention blocks; their heads * head_dim must equal cross_attention_dim
    vl_heads: int = 2
    vl_head_dim: int = 32
    num_timestep_buckets: int = 1000
    # CogACT
    cond_dim: int = 64  # token_size: width of the cognition feature
    class_dropout_prob: float = 0.1  # training: condition replaced by the learned null condition
    adaln_zero: bool = False  # DiT adaLN-Zero conditioning instead of the in-context condition token

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"ActionDiTConfig.mode must be one of {MODES}, got {self.mode!r}")
        groot = self.mode == "groot_n15"
        check_positive(self, ["action_dim", "horizon", "num_layers", "num_heads", "head_dim", "ff_mult", "n_obs_steps"]
                       + (["cross_attention_dim", "hidden_size", "state_dim", "num_embodiments", "max_seq_len",
                           "vl_heads", "vl_head_dim", "num_timestep_buckets"] if groot else ["cond_dim"]))
        if groot and self.vl_heads * self.vl_head_dim != self.cross_attention_dim:
            raise ValueError(f"vl_heads * vl_head_dim = {self.vl_heads * self.vl_head_dim} must equal "
                             f"cross_attention_dim {self.cross_attention_dim}")
        if groot and self.horizon > self.max_seq_len:
            raise ValueError(f"horizon {self.horizon} exceeds the position table (max_seq_len {self.max_seq_len})")
        if groot and self.adaln_zero:
            raise ValueError("adaln_zero is a CogACT-mode switch; GR00T N1.5 uses AdaLayerNorm on attention only")
        if self.instruction_dim and not 0 < self.instruction_dim < self.obs_dim:
            raise ValueError(f"instruction_dim {self.instruction_dim} must be below obs_dim {self.obs_dim} "
                             "(the observation is [state ; instruction embedding])")
        if not 0 <= self.class_dropout_prob < 1 or not 0 <= self.dropout < 1:
            raise ValueError("dropout probabilities must be in [0, 1)")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def groot_n15(cls, action_dim: int = 32, state_dim: int = 64, **kw) -> "ActionDiTConfig":
        """GR00T N1.5's real action head (1.07 B params: DiT blocks 0.54 B, vl_self_attention 0.20 B, the 32
        embodiments' encoders / decoder 0.32 B). Sources:
        16 blocks x 32 heads x 48 = 1536, cross_attention_dim = backbone_embedding_dim 2048, output_dim =
        hidden_size 1024, vl_self_attention 4 x 32 x 64, 32 future tokens, max_seq_len 1024, 32 embodiments,
        action_horizon 16, action_dim 32, max_state_dim 64, 4 inference steps, 1000 buckets: the public N1.5
        checkpoint config.json as reported in tests/fixtures/vla/README.md (table "Tiny configuration");
        max_seq_len 1024 / 32 embodiments / hidden_size 1024 are also the FlowmatchingActionHeadConfig defaults
        (lerobot v0.4.4 flow_matching_action_head.py); FF 4x GELU-tanh, dropout 0.2, interleaved cross/self
        blocks, AdaLayerNorm: cross_attention_dit.py (DiT, BasicTransformerBlock defaults) and the config."""
        return cls(**{**dict(action_dim=action_dim, mode="groot_n15", horizon=16, num_layers=16, num_heads=32,
                             head_dim=48, dropout=0.2, cross_attention_dim=2048, hidden_size=1024,
                             state_dim=state_dim, num_embodiments=32, num_future_tokens=32, max_seq_len=1024,
                             vl_layers=4, vl_heads=32, vl_head_dim=64), **kw})

    @classmethod
    def cogact(cls, size: str = "B", action_dim: int = 7, cond_dim: int = 4096, **kw) -> "ActionDiTConfig":
        """CogACT's action model (microsoft/CogACT action_model/action_model.py: DiT-S 6 x 384 with 4 heads,
        DiT-B 12 x 768 / 12 heads (the released models), DiT-L 24 x 1024 / 16 heads; models.py: mlp_ratio 4,
        GELU-tanh, LayerNorm eps 1e-6 without affine, qkv bias, class_dropout_prob 0.1 with a learned
        `uncondition`, token_size 4096 = the LLM width; vla/cogactvla.py: future_action_window_size 15 -> 16
        actions, 7-d actions, cognition feature = the LLM's last hidden state at the last token).
        Diffusion there (create_diffusion): 100 steps, squaredcos_cap_v2, epsilon, fixed-small variance,
        sampled with DDIM-10 (timesteps 90, 80, ..., 0, eta 0), CFG 1.5, `clip_denoised=False`. Our DDPM/DDIM
        schedule is Diffusion Policy's: the same 100-step squaredcos_cap_v2 betas (max 0.999), the same DDIM
        timesteps and final alpha 1, but x0 is clipped to [-1, 1] at every step (CogACT clips only the final
        actions), so a CogACT checkpoint sampled here differs only by that clipping."""
        layers, width, heads = {"S": (6, 384, 4), "B": (12, 768, 12), "L": (24, 1024, 16)}[size]
        return cls(**{**dict(action_dim=action_dim, mode="cogact", horizon=16, num_layers=layers, num_heads=heads,
                             head_dim=width // heads, cond_dim=cond_dim), **kw})
