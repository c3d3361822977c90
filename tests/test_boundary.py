"""The boundary between tensors and the compiled kernels (fastdistill/backends/_ext.py): every
check happens before a pointer crosses, as a ValueError / TypeError naming the argument, and the
kernels' own status codes for what only they see. No GPU needed: the checks do not depend on
the device, and the CUDA launchers run through the host emulation (tests/cuda_emu/)."""

import ctypes

import pytest
import torch

from fastdistill.backends import _ext
from fastdistill.config import DistillConfig
from util import cpu_backends

pytestmark = pytest.mark.skipif(_ext._C is None, reason="fastdistill._C is not built")
OPTS = DistillConfig().kernel_options()


def args(s, t, labels=None, grad=None, rows=None, scale=None, vocab=None):
    rows = rows if rows is not None else torch.empty(s.shape[0])
    scale = scale if scale is not None else torch.ones(())
    return _ext.distill_args(s, t, labels, grad, rows, scale, OPTS,
                             vocab if vocab is not None else s.shape[1])


def test_distill_args_are_checked():
    s, t = torch.randn(4, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="teacher_logits is on meta, expected cpu"):
        args(s, t.to("meta"))
    with pytest.raises(ValueError, match="unit stride"):
        args(s, torch.randn(16, 4).t())
    with pytest.raises(TypeError, match="student_logits must be float32, float16 or bfloat16"):
        args(s.double(), t)
    with pytest.raises(ValueError, match="must be 2-D"):
        args(s[0], t, vocab=16)
    with pytest.raises(TypeError, match="labels must be torch.int64"):
        args(s, t, labels=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"labels must be a contiguous tensor of shape \(4,\)"):
        args(s, t, labels=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must be a contiguous"):
        args(s, t, labels=torch.zeros(8, dtype=torch.int64)[::2])
    with pytest.raises(TypeError, match="grad must be torch.float32"):
        args(s, t, grad=s.half())
    with pytest.raises(ValueError, match="overlapping rows"):
        args(s, t, grad=torch.zeros(16).expand(4, 16))
    with pytest.raises(ValueError, match="vocab must be in"):
        args(s, t, vocab=17)
    with pytest.raises(TypeError, match="grad_scale must be a one-element float32"):
        args(s, t, grad=torch.empty_like(s), scale=torch.ones(2))
    with pytest.raises(ValueError, match="teacher_logits has 3 rows"):
        args(s, t[:3])
    a = args(s, t, grad=s)  # the gradient may be written over the student
    assert a.grad == a.student == s.data_ptr() and a.params.vocab == 16


def test_cuda_backend_rejects_cpu_tensors():
    from fastdistill.backends import cuda_backend
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match="the cuda backend runs on CUDA tensors, student_logits"):
        cuda_backend.distill_forward(s, s, None, OPTS, 8, torch.ones(()), True)
    with pytest.raises(ValueError, match="the cuda backend runs on CUDA tensors, student is"):
        cuda_backend.feature_forward(s, s, None, 0, torch.ones(()), True)
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        cuda_backend.distill_forward([1.0], s, None, OPTS, 8, torch.ones(()), True)


def test_last_dimension_of_one_with_any_stride():
    """A [N, 1] view with a row stride: accepted (unit stride does not matter for one column);
    no assert guards a pointer (python -O removes asserts)."""
    s = torch.randn(4, 3)[:, :1]
    a = args(s, s.clone())
    assert a.s_stride == 3


def test_feature_and_scale_args_are_checked():
    s = torch.randn(4, 8)
    rows, one = torch.empty(4), torch.ones(())
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        _ext.feature_args(s, s, torch.ones(4), None, rows, one, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        _ext.feature_args(s, s, None, None, rows, one, 7)
    with pytest.raises(ValueError, match="at least one feature"):
        _ext.feature_args(s[:, :0], s[:, :0], None, None, rows, one, 0)
    with pytest.raises(ValueError, match="teacher must have the student's shape"):
        _ext.feature_args(s, s[:, :4], None, None, rows, one, 0)
    with pytest.raises(ValueError, match=r"factor must be a contiguous tensor of shape \(4,\)"):
        _ext.scale_args(s, torch.ones(3))


@pytest.mark.skipif("cuda_emu" not in cpu_backends(), reason="needs a C++ compiler")
def test_kernels_report_what_only_they_see():
    """Status codes of the launchers for arguments the Python checks never let through."""
    import emu_backend
    lib = emu_backend.lib()
    assert lib.emu_sizeof(0) > 0
    s, rows = torch.randn(2, 10), torch.empty(2)
    a = args(s, s.clone(), grad=torch.empty_like(s))
    a.grad_width = 5  # narrower than the vocabulary: a bad argument, nothing launched
    assert lib.emu_distill(ctypes.c_void_p(a.address)) == 1
    a = args(s, s.clone())
    a.s_dtype = 5
    assert lib.emu_distill(ctypes.c_void_p(a.address)) == 2
    f = _ext.feature_args(s, s.clone(), None, None, rows, torch.ones(()), 0)
    f.kind = 7
    assert lib.emu_feature(ctypes.c_void_p(f.address)) == 1
