"""Matrix products for inference on the CPU: faster than F.linear, and batch-invariant.

`model.py` is plain PyTorch: every product is an `nn.Linear`. This module is an accelerator
put on afterwards, as gpt-fast applies quantization to a loaded model: the loader calls
`use_cpu_kernels(model)`, which swaps each `nn.Linear` for a `CPULinear` holding the same
parameters (same names, the tied `lm_head` still tied), whose product goes through `linear`.

`linear` multiplies with oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op
torch.compile's CPU backend itself uses) where F.linear would use MKL. Two reasons:

- Batch invariance. A row's result must not depend on how many rows share the product: sample
  i's text must be the same however the samples are batched, and on a near-flat row over 50k
  tokens a difference of 3e-8 in the logits is enough to draw another token. MKL computes one
  row, a few rows and many rows with different kernels that add in different orders. oneDNN
  computes every row count from 2 up with one kernel and one order per row; a single row,
  which it would give to a matrix-vector kernel, is padded with a zero row (`FEW_ROWS`).
  oneDNN does not promise this: tests/test_batch_invariance.py checks it bit for bit, on
  GPT-2's shapes, for 1 to 2048 rows and on whole models.
- Speed: oneDNN is faster than MKL for the few rows of a decode step (docs/speed.md has the
  figures and the commands that measured them).

`use_cpu_kernels` also gives each layer a copy of its weight in oneDNN's own blocked layout
(`pack_weight`, the reordering torch.compile's CPU backend does when it freezes weights), which
`packed_linear` multiplies. Unpacked, oneDNN reorders the weight inside every call: a decode
step then reads each weight twice and writes it once. Packed, it streams the weight once, and
one kernel serves every row count, one row included (no padding): 1.8x faster per product on
the 2-core EPYC (docs/speed.md), and held bit for bit by the same tests, and equal to the
unpacked route's bits. The copy costs memory (the products' weights once more: +470 MB for
GPT-2 124M), so `use_cpu_kernels` packs only while the machine's available memory keeps
PACK_HEADROOM to spare; past it the layers keep the unpacked route (same bits, slower). A copy
is made again if the weight is changed or replaced after packing.

`linear` steps aside for plain F.linear (which autograd, autocast and torch.compile know):
under torch.compile (inductor picks its own kernels, and tracing the private op fails), when
autograd records (grad enabled and an operand requires grad), under autocast, off the CPU,
for any dtype but float32, for a weight that is not contiguous, and when this build of torch
has no oneDNN linear (the op is private: a release may drop it). Batch invariance holds where
oneDNN runs, that is for CPU float32 inference in eager mode, and nowhere else.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

# oneDNN multiplies a single row with a matrix-vector kernel that adds in another order than
# its kernel for 2 rows and more: products of fewer rows than this are padded with zero rows.
FEW_ROWS = 2


def onednn_linear_op():
    """oneDNN's float32 linear, or None where this build of torch has none."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def pack_weight_op():
    """oneDNN's weight reordering for its linear, or None where this build of torch has none."""
    try:
        if onednn_linear_op() is None:
            return None
        return torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return None


# oneDNN picks the packed layout for a row count it is told; measured bit-identical for every
# row count from 1 up with a layout packed for 2 (tests/test_batch_invariance.py holds it).
PACKED_FOR_ROWS = 2
PACK_HEADROOM = 0.5  # pack only if the copies leave at least this share of available memory


def available_memory():
    """Bytes of memory the system could give now (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pack_weight(weight):
    """`weight` (out, in) in oneDNN's blocked layout for `packed_linear` (an opaque tensor)."""
    return pack_weight_op()(weight.detach(), PACKED_FOR_ROWS)


def packed_linear(x, packed, bias, out_features, op=None):
    """x @ weight.T + bias with the weight packed by `pack_weight`: (..., in) -> (..., out).
    `op`: `onednn_linear_op()`, when the caller has it already."""
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)                                       # (rows, in)
    if x2.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], out_features)
    y = (op or onednn_linear_op())(x2, packed, bias, "none", [], "")      # (rows, out)
    return y.reshape(*x.shape[:-1], out_features)


def _steps_aside(x, weight, bias):
    """Whether `linear` must leave this product to F.linear."""
    return (torch.compiler.is_compiling()
            or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or not weight.is_contiguous()
            or (bias is not None and bias.dtype != torch.float32)
            or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled()
                and (x.requires_grad or weight.requires_grad
                     or (bias is not None and bias.requires_grad))))


def linear(x, weight, bias=None):
    """x @ weight.T + bias: (..., in) -> (..., out), with weight (out, in) as in nn.Linear.

    oneDNN's linear on the CPU in float32 inference (each row's result independent of the row
    count), F.linear everywhere else. The two differ by float32 rounding only.
    """
    if _steps_aside(x, weight, bias):
        return F.linear(x, weight, bias)
    op = onednn_linear_op()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if op is None or rows == 0:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, in_features)                                     # (rows, in)
    if rows < FEW_ROWS:
        x2 = torch.cat([x2, x2.new_zeros(FEW_ROWS - rows, in_features)])  # (FEW_ROWS, in)
    y = op(x2, weight, bias, "none", [], "")[:rows]                       # (rows, out)
    return y.reshape(*x.shape[:-1], out_features)


class CPULinear(nn.Linear):
    """nn.Linear (same parameters, same names) whose product goes through `packed_linear`
    (or `linear` where there is no packed copy, or it is stale, or the product steps aside)."""

    packed = None        # the weight in oneDNN's layout (`pack`), or None
    _packed_from = None  # (the weight tensor packed, its version then): stale when either moves

    def pack(self):
        """Make the packed copy of the current weight, where this torch can."""
        if pack_weight_op() is not None and self.weight.device.type == "cpu" \
                and self.weight.dtype == torch.float32 and self.weight.is_contiguous():
            self.packed = pack_weight(self.weight)
            self._packed_from = (self.weight, self.weight._version)

    def forward(self, x):
        op = onednn_linear_op()
        if self.packed is None or op is None or _steps_aside(x, self.weight, self.bias):
            return linear(x, self.weight, self.bias)
        weight, version = self._packed_from
        if weight is not self.weight or version != self.weight._version:
            self.pack()  # the weight was replaced or changed in place since it was packed
        return packed_linear(x, self.packed, self.bias, self.out_features, op)


def use_cpu_kernels(model):
    """Swap every nn.Linear of `model` for a CPULinear sharing its parameters; returns `model`.

    Changes nothing off the CPU or where torch has no oneDNN linear. The swap keeps every
    parameter object, so tied weights stay tied and the state dict keeps its names. Each
    layer also gets its packed copy, where memory allows (see the top of this file).
    """
    if onednn_linear_op() is None or any(p.device.type != "cpu" for p in model.parameters()):
        return model
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    copies = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    available = available_memory()
    pack = available is None or copies <= (1 - PACK_HEADROOM) * available
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _routed(child, pack))
    return model


def _routed(layer, pack):
    """A CPULinear holding `layer`'s own weight and bias (built on meta: nothing allocated),
    with its packed copy if `pack`."""
    routed = CPULinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device="meta")
    routed.weight = layer.weight
    routed.bias = layer.bias
    routed.train(layer.training)
    if pack:
        routed.pack()
    return routed
