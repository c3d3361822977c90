"""The fused linear backward (fastdistill/kernels/linear.py, linear_grad_kernel) gives ignored
rows exactly zero gradient tiles, even when their statistics are not finite: a padding row of
precomputed teacher logits that is all -inf has log-sum-exp -inf and NaN statistics, and a
multiplication by its zero row factor (0 x NaN) would carry NaN into grad_weight through the
GEMM. Runs through the Triton interpreter on CPU (small shapes)."""

import pytest
import torch

import fastdistill as fd
from fastdistill.divergences import reference_distill_loss
from util import assert_close, cpu_backends

pytestmark = pytest.mark.skipif("triton" not in cpu_backends(),
                                reason="needs the triton backend (interpreter on CPU)")


def _inputs(N=9, D=20, V=37):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).float()
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5 * 3).float()
    b = torch.randn(V, generator=g, dtype=torch.float64).float()
    t = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).float()
    labels = torch.randint(0, V, (N,), generator=g)
    return h, w, b, t, labels


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
@pytest.mark.parametrize("hard_weight", [0.0, 0.4])
def test_ignored_padding_rows_with_neg_inf_teacher_get_zero_gradient(divergence, hard_weight):
    h, w, b, t, labels = _inputs()
    pad = [2, 7]
    labels[pad] = -100
    t_pad = t.clone()
    t_pad[pad] = float("-inf")  # padding rows of the teacher's logits
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = fd.linear_distill_loss(leaves[0], leaves[1], None, None, labels,
                                  teacher_logits=t_pad, student_bias=leaves[2],
                                  divergence=divergence, hard_weight=hard_weight,
                                  temperature=1.5, backend="triton", mode="fused")
    loss.backward()
    for name, x in zip(("hidden", "weight", "bias"), leaves):
        assert torch.isfinite(x.grad).all(), \
            f"grad {name}: expected finite values, got NaN/inf from the ignored -inf rows"
    assert torch.all(leaves[0].grad[pad] == 0), "ignored rows must get exactly zero grad_hidden"
    # the ignored rows do not matter: the reference sees finite teacher logits there
    ref_leaves = [x.double().requires_grad_() for x in (h, w, b)]
    zs = ref_leaves[0] @ ref_leaves[1].t() + ref_leaves[2]
    ref = reference_distill_loss(zs, t.double(), labels, divergence=divergence,
                                 hard_weight=hard_weight, temperature=1.5)
    ref.backward()
    assert_close(loss, ref, rtol=3e-5, atol=3e-5, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        assert_close(a.grad, r.grad, rtol=3e-4, atol=3e-6, what=f"grad {name}")
