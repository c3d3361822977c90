"""In-place gradient scaling for backward: ``grad[r, :] *= factor[r]`` (or a scalar factor).

The factor is read on the device and tiles whose factor is exactly 1 (the usual grad_output of
a loss) return without touching memory, so backward costs one tiny launch and no host sync.
"""

import torch
import triton
import triton.language as tl

from fastdistill.kernels import interpreting


@triton.jit
def scale_rows_kernel(g_ptr, g_stride, f_ptr, W, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        f = tl.load(f_ptr + row)
    else:
        f = tl.load(f_ptr)
    if f != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ptr = g_ptr + row * g_stride + cols
        g = tl.load(ptr, mask=cols < W, other=0.0).to(tl.float32)
        tl.store(ptr, (g * f).to(g_ptr.dtype.element_ty), mask=cols < W)


def scale_rows_(grad, factor):
    """grad [N, W] (unit stride along W) *= factor (0-d, or [N] with PER_ROW)."""
    g2 = grad.reshape(grad.shape[0], -1) if grad.dim() != 2 else grad
    N, W = g2.shape
    if N == 0 or W == 0:
        return
    assert g2.stride(1) == 1 or W == 1
    per_row = factor.dim() > 0
    f = factor.to(device=grad.device, dtype=torch.float32).contiguous()
    block = 64 if interpreting() else 2048
    scale_rows_kernel[(N, triton.cdiv(W, block))](g2, g2.stride(0), f, W, PER_ROW=per_row,
                                                  BLOCK=block, num_warps=4)
