"""FlowExpertConfig: the sizes and switches of policy_accel/models/flow_expert.py (SmolVLA, π0, π0.5), with the
real-size constructors and where each number comes from upstream."""

from dataclasses import dataclass

from policy_accel.models.blocks import check_positive

MODES = ("smolvla", "pi0", "pi05")


@dataclass
class FlowExpertConfig:
    mode: str = "smolvla"  # "smolvla" | "pi0" | "pi05"
    action_dim: int = 32
    horizon: int = 50  # action chunk length
    n_layer: int = 16  # expert layers = VLM layers whose K/V it reads (layer i reads VLM layer i)
    width: int = 720
    n_head: int = 15  # q heads; q width n_head * head_dim may differ from width
    n_kv_head: int = 5  # of the expert and of the prefix K/V
    head_dim: int = 64
    mlp_dim: int = 2048
    self_attn_every_n_layers: int = 2  # SmolVLA: layer i self-attends iff i % n == 0, else cross-attends
    min_period: float = 4e-3  # sine-cosine time embedding
    max_period: float = 4.0
    rope_max_wavelength: float = 10_000.0
    prefix_len: int = 241  # prefix tokens of the upstream model (stand_ins.random_prefix, for profiling)
    obs_dim: int = 0  # > 0: a stand-in VLM (stand_ins.PrefixEncoder) makes the prefix from obs (B, To, obs_dim)
    n_obs_steps: int = 1
    prefix_width: int = 960  # the VLM's text-transformer width and MLP (the stand-in's, and the profile's)
    prefix_mlp_dim: int = 2560
    state_dim: int = 0  # π0 only: the state token's input (from obs: the current observation)
    instruction_dim: int = 0  # > 0: the last instruction_dim obs dims are an instruction embedding (own token)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown flow expert mode {self.mode!r}; expected one of {MODES}")
        if self.instruction_dim and not 0 < self.instruction_dim < self.obs_dim:
            raise ValueError(f"instruction_dim {self.instruction_dim} must be below obs_dim {self.obs_dim} "
                             "(the observation is [state ; instruction embedding])")
        check_positive(self, ("action_dim", "horizon", "n_layer", "width", "n_head", "n_kv_head", "head_dim",
                              "mlp_dim", "self_attn_every_n_layers", "prefix_len", "n_obs_steps", "prefix_width",
                              "prefix_mlp_dim"))
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2 or self.width % 2:
            raise ValueError(f"head_dim ({self.head_dim}) and width ({self.width}) must be even (RoPE, sin-cos time)")
        if (self.mode == "pi0") != (self.state_dim > 0):
            raise ValueError(f"state_dim={self.state_dim} with mode {self.mode!r}: π0 needs its state token "
                             "(state_dim > 0); SmolVLA and π0.5 carry the state in the prefix (state_dim = 0)")

    def is_cross(self, layer: int) -> bool:
        return self.mode == "smolvla" and layer % self.self_attn_every_n_layers != 0

    @classmethod
    def smolvla(cls, **kw) -> "FlowExpertConfig":
        """SmolVLA (LeRobot `policies/smolvla`) at its real size.

        n_layer 16: `SmolVLAConfig.num_vlm_layers` = 16 and `num_expert_layers` = -1 (expert layers = VLM layers,
        `SmolVLMWithExpertModel.__init__`); width 720 = int(960 × `expert_width_multiplier` 0.75); q heads 15,
        kv heads 5, head_dim 64 and prefix_width 960, prefix_mlp_dim 2560: the VLM text config the expert config
        is deep-copied from (SmolVLM-500M's SmolLM2 text model, HF config.json); mlp_dim 2048 =
        `get_intermediate_size(720)` (smolvlm_with_expert.py); self_attn_every_n_layers 2 and attention_mode
        "cross_attn" (configuration_smolvla.py); horizon 50 = `chunk_size`, action_dim 32 = `max_action_dim`,
        10 steps = `num_steps`; min/max period 4e-3 / 4.0; RoPE max_wavelength 10000 (`apply_rope`).
        prefix_len 241 = 3 cameras × 64 tokens (512 px, patch 16, pixel shuffle ×4: `image_seq_len` 64 in the
        SmolVLM2-500M processor_config.json) + `tokenizer_max_length` 48 + 1 state token (`embed_prefix`).
        """
        return cls(**{**dict(mode="smolvla", action_dim=32, horizon=50, n_layer=16, width=720, n_head=15,
                             n_kv_head=5, head_dim=64, mlp_dim=2048, prefix_len=3 * 64 + 48 + 1,
                             prefix_width=960, prefix_mlp_dim=2560), **kw})

    @classmethod
    def pi0(cls, **kw) -> "FlowExpertConfig":
        """π0 (LeRobot `policies/pi0`, a port of openpi) at its real size.

        Expert = `get_gemma_config("gemma_300m")` (modeling_pi0.py, `PI0Config.action_expert_variant`): 18 layers
        × 1024, 8 q heads / 1 kv head × 256, MLP 4096 (GeGLU, `hidden_activation` gelu_pytorch_tanh); the VLM =
        "gemma_2b" (`paligemma_variant`): width 2048, MLP 16384, same 18 layers and heads. RMSNorm eps 1e-6 with
        (1 + weight) (`PiGemmaRMSNorm`). horizon 50 = `chunk_size`, action/state dims 32 = `max_action_dim` /
        `max_state_dim`, 10 steps = `num_inference_steps` (configuration_pi0.py). prefix_len 816 = 3 images ×
        256 SigLIP tokens (224 px / patch 14, `image_resolution`) + `tokenizer_max_length` 48.
        """
        return cls(**{**dict(mode="pi0", action_dim=32, horizon=50, n_layer=18, width=1024, n_head=8, n_kv_head=1,
                             head_dim=256, mlp_dim=4096, prefix_len=3 * 256 + 48, prefix_width=2048,
                             prefix_mlp_dim=16384, state_dim=32), **kw})

    @classmethod
    def pi05(cls, **kw) -> "FlowExpertConfig":
        """π0.5 (LeRobot `policies/pi05`) at its real size: the π0 expert and VLM (`get_gemma_config`, same
        variants in configuration_pi05.py) with adaptive RMSNorm (`use_adarms=[False, True]`,
        `PiGemmaRMSNorm(cond_dim=1024)`); no state token (the state is discretised into the prompt,
        processor_pi05.py); prefix_len 968 = 3 × 256 image tokens + `tokenizer_max_length` 200.
        """
        return cls.pi0(**{**dict(mode="pi05", prefix_len=3 * 256 + 200, state_dim=0), **kw})
