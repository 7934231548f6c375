"""Half-precision inference: which dtypes a policy runs in, and the fp32 boundary around the denoiser.

The denoiser's weights and activations go to bf16 / fp16; the sampler keeps its state x and its
update in fp32 (Policy.set_dtype says which parts and why), so the denoiser is called through
`HalfPrecisionDenoiser`: x in as the half dtype, the prediction back as fp32.
"""

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    """torch.float32 / torch.bfloat16 / torch.float16, or one of their names ("bf16", "float16", ...)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ValueError(f"unsupported policy dtype {dtype!r}; expected torch.float32, torch.bfloat16 or torch.float16 "
                     f"(or one of {', '.join(DTYPES)})")


class HalfPrecisionDenoiser:
    """The denoiser in half precision behind an fp32 boundary: x goes in as `dtype`, the prediction
    comes back as fp32 for the sampler's update."""

    def __init__(self, model, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, ctx) -> torch.Tensor:
        return self.model(x.to(self.dtype), t, ctx).float()
