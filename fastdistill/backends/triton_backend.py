"""Triton backend: the kernels of fastdistill/kernels/.

Same contract as backends/torch_backend.py. Runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (the interpreter; small shapes only).
"""


def distill_forward(student, teacher, labels, opts, vocab, grad_scale, need_grad, grad_out=None):
    from fastdistill.kernels import distill
    return distill.distill_forward(student, teacher, labels, opts, vocab, grad_scale, need_grad,
                                   grad_out)


def feature_forward(student, teacher, mask, kind, grad_scale, need_grad):
    from fastdistill.kernels import feature
    return feature.feature_forward(student, teacher, mask, kind, grad_scale, need_grad)


def topk_forward(student, indices, logprobs, labels, opts, tail, vocab, grad_scale, need_grad,
                 grad_out=None):
    from fastdistill.kernels import topk
    return topk.topk_forward(student, indices, logprobs, labels, opts, tail, vocab, grad_scale,
                             need_grad, grad_out)
