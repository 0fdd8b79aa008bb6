"""Reduced-precision matrix products on the CPU (`--quantize`): fp16, bf16 or int8 weights.

An accelerator put on a loaded float32 model, as `cpu_kernels.py` is and as gpt-fast applies
its quantization: `quantize(model, mode)` swaps each `nn.Linear` for a module holding the
weight in fewer bits. `model.py` does not change, and the embedding tables, LayerNorms,
attention and the residual stream stay float32: only the products' weights are smaller, and
the products add in float32 (int8: int32, then scaled back to float32). Decoding one token
reads every weight once, so at small batches a step costs about what the weights weigh.

| mode   | weight        | product                                                       |
|--------|---------------|---------------------------------------------------------------|
| `none` | float32       | `cpu_kernels.linear` (oneDNN), the default                    |
| `fp16` | float16       | FBGEMM's fp16 GEMM: weights widened to float32 in registers   |
| `bf16` | bfloat16      | x cast to bfloat16, `F.linear` (oneDNN: native on AVX-512 BF16 |
|        |               | and AMX CPUs, emulated and slow elsewhere), result to float32 |
| `int8` | int8, a scale | FBGEMM's dynamic int8 linear: each call quantizes x to 8 bits |
|        | per output row| (one scale and zero point for the whole call), exact integer  |
|        | (7-bit range) | sums, scaled back to float32                                  |

What each gives up, measured by `bench.py --precision` (greedy agreement with float32 over
256 tokens, and the KL divergence of the next-token distribution): fp16 and bf16 round each
weight (relative error 2^-11 and 2^-8); int8 rounds weights to 127 levels per row and each
call's input to 256 levels, which is the larger error. None of them is batch-invariant:
FBGEMM picks its kernels by row count and int8's input scale depends on every row of the call,
so sample i's text can change with `--batch_size`. For a fixed batch size the run is repeatable.

FBGEMM is torch's x86 quantized backend (`torch.backends.quantized.supported_engines`); its
ops live in `torch.ops.quantized`, which torch has deprecated in favour of torchao but still
ships. Where they are missing `check_available` says so, and sample.py turns it into an error.
"""

import warnings

import torch
import torch.nn as nn
from torch.nn import functional as F

MODES = ("none", "fp16", "bf16", "int8")
WEIGHT_LEVELS = 63  # int8 weights in -63..63 (see Int8Linear)


def check_available(mode):
    """None if `mode` can run on this machine's CPU with this torch, else why not (a sentence)."""
    if mode in ("none", "bf16"):
        return None
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return (f"this build of torch has no FBGEMM (x86) kernels (it has "
                f"{', '.join(torch.backends.quantized.supported_engines) or 'none'})")
    try:
        torch.ops.quantized.linear_prepack_fp16
        torch.ops.quantized.linear_dynamic
    except (AttributeError, RuntimeError):
        return "this version of torch no longer has torch.ops.quantized's dynamic linear"
    return None


class Float16Linear(nn.Module):
    """nn.Linear with its weight in float16, multiplied by FBGEMM's fp16 GEMM (float32 x, y)."""

    def __init__(self, layer):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.packed = torch.ops.quantized.linear_prepack_fp16(layer.weight.detach(),
                                                              _detached(layer.bias))

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class BFloat16Linear(nn.Module):
    """nn.Linear with its weight in bfloat16: x is rounded to bfloat16 for the product, which
    adds in float32 inside oneDNN; the result comes back as float32."""

    def __init__(self, layer):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight", layer.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", _detached(layer.bias))  # float32: added after the product

    def forward(self, x):
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """nn.Linear with its weight in int8, one float scale per output row, multiplied by
    FBGEMM's dynamic int8 linear.

    FBGEMM multiplies 8-bit inputs (0..255) by 8-bit weights and adds the products in pairs
    into 16 bits, which saturates past 32767: 255 * 127 * 2 can overflow. Either the inputs or
    the weights must give up a bit. The weights do (each row's largest |w| maps to 63), and
    the inputs keep all 256 levels: on the shipped model's greedy text that agrees with
    float32 at 98.3% of steps, against 96.6% for 7-bit inputs and 8-bit weights (torch's
    `reduce_range`), and halves the KL divergence (bench.py's fidelity measure).
    """

    def __init__(self, layer):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        weight = layer.weight.detach()                                   # (out, in)
        scales = (weight.abs().amax(dim=1) / WEIGHT_LEVELS).clamp_min(1e-12)  # (out,)
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated (torchao)
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0,
                                                 torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, _detached(layer.bias))

    def forward(self, x):
        # reduce_range=False: the input's full 8 bits (the weights' 7 bits keep the sums in range)
        return torch.ops.quantized.linear_dynamic(x, self.packed, False)


LAYERS = {"fp16": Float16Linear, "bf16": BFloat16Linear, "int8": Int8Linear}


def quantize(model, mode):
    """Swap every nn.Linear of a float32 CPU `model` for its `mode` version; returns `model`.

    `mode` "none" changes nothing. The tied `lm_head` gets its own reduced copy: the token
    embedding (`wte`) stays float32 for the lookups.
    """
    assert mode in MODES, f"unknown quantize mode {mode!r}"
    if mode == "none":
        return model
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()), \
        "quantize takes a float32 model on the CPU"
    assert check_available(mode) is None, check_available(mode)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, LAYERS[mode](child))
    return model


def _detached(t):
    return None if t is None else t.detach().float().contiguous()
