"""Residual sub-blocks for transformer denoisers.

Each block owns its pre-norm and returns only its residual-branch output, so a layer reads

    x = x + layer.self_attn(x)
    x = x + layer.cross_attn(x, memory)
    x = x + layer.ff(x)

The cache engine wraps these modules by name and may return a stored or forecast branch output
instead of calling them: they must stay side-effect free and return a tensor shaped like x.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # (B, H, S, hd) each


class Dropout(nn.Module):
    """nn.Dropout, with a cheaper mask on CPU: torch draws one Bernoulli per element there, which made DP-T's
    dropouts a quarter of a training step; here each 64-bit random draw gives 8 mask bytes (4x faster), so p
    is rounded to a multiple of 1/256 (0.3 -> 77/256). Other devices use F.dropout."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        dropped = round(self.p * 256)
        n = x.numel()
        draws = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64)
        keep = draws.view(torch.uint8)[:n].view(x.shape) >= dropped
        return x * keep.to(x.dtype).mul_(256 / (256 - dropped))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention; `mask` (T, T): bool (True = may attend) or additive float."""

    def __init__(self, n_emb: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        assert n_emb % n_head == 0, f"n_emb {n_emb} must be divisible by n_head {n_head}"
        self.n_head = n_head
        self.dropout = dropout
        self.norm = nn.LayerNorm(n_emb)
        self.qkv = nn.Linear(n_emb, 3 * n_emb)
        self.proj = nn.Linear(n_emb, n_emb)
        self.resid_drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class CrossAttention(nn.Module):
    """Pre-norm cross-attention from x to memory tokens; `mask` (T, S) like SelfAttention's.

    `memory` is the raw memory (B, S, C) or a list of (k, v) parts from `kv(...)`, concatenated
    along the token axis here (a part with batch 1 is broadcast). Keys and values are projections
    of the memory alone (it is not normed here), so memory tokens that do not change across
    denoising steps can be projected once per chunk.
    """

    def __init__(self, n_emb: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        assert n_emb % n_head == 0, f"n_emb {n_emb} must be divisible by n_head {n_head}"
        self.n_head = n_head
        self.dropout = dropout
        self.norm = nn.LayerNorm(n_emb)
        self.q = nn.Linear(n_emb, n_emb)
        self.kv_proj = nn.Linear(n_emb, 2 * n_emb)
        self.proj = nn.Linear(n_emb, n_emb)
        self.resid_drop = Dropout(dropout)

    def kv(self, memory: torch.Tensor) -> KV:
        """(B, S, C) -> keys and values (B, H, S, hd)."""
        B, S, C = memory.shape
        k, v = self.kv_proj(memory).split(C, dim=2)
        return k.view(B, S, self.n_head, C // self.n_head).transpose(1, 2), \
            v.view(B, S, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | list[KV], mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        B, T, C = x.shape
        if isinstance(memory, torch.Tensor):
            k, v = self.kv(memory)
        else:
            k = torch.cat([k.expand(B, -1, -1, -1) for k, _ in memory], dim=2)
            v = torch.cat([v.expand(B, -1, -1, -1) for _, v in memory], dim=2)
        q = self.q(self.norm(x)).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    """Pre-norm MLP, GELU, hidden width 4x."""

    def __init__(self, n_emb: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(n_emb)
        self.fc = nn.Linear(n_emb, 4 * n_emb)
        self.act = nn.GELU()
        self.drop = Dropout(dropout)
        self.proj = nn.Linear(4 * n_emb, n_emb)
        self.resid_drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_drop(self.proj(self.drop(self.act(self.fc(self.norm(x))))))


def decay_groups(model: nn.Module, weight_decay: float, extra: tuple[type, str] | None = None) -> list[dict]:
    """AdamW groups: every nn.Linear weight (and `extra` = (module type, parameter name)) decays; biases,
    norms, embeddings and learned tokens do not."""
    decay = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if extra is not None:
        decay |= {f"{n}.{extra[1]}" for n, m in model.named_modules() if isinstance(m, extra[0])}
    params = dict(model.named_parameters())
    return [{"params": [p for n, p in params.items() if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0}]


def check_positive(config, names) -> None:
    """Raise unless every field in `names` of the dataclass `config` is a positive int."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


def family_config(config_cls, family_name: str, fixed: dict, arch: dict):
    """`config_cls(**fixed, **arch)`: `fixed` holds the sizes that follow the policy's fields, `arch` the rest."""
    clash = set(fixed) & set(arch)
    if clash:
        raise ValueError(f"the architecture must not set {sorted(clash)}: they follow the policy's fields")
    try:
        return config_cls(**fixed, **arch)
    except TypeError as e:
        raise ValueError(f"bad architecture field for {family_name}: {e}") from None


def init_linear(module: nn.Module) -> bool:
    """GPT-style init of an nn.Linear (weights N(0, 0.02), zero bias); False for any other module."""
    if not isinstance(module, nn.Linear):
        return False
    nn.init.normal_(module.weight, std=0.02)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return True
