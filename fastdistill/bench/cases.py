"""Benchmark problems and the providers compared on them.

A spec is a plain dict (it crosses a process boundary): ``op`` ("distill", "linear",
"feature"), ``provider``, sizes (``N``, ``V``, ``D``, ``Dt``, ``pairs``), ``dtype``, ``device``,
``divergence``, ``temperature``, ``hard_weight``. ``build(spec)`` returns ``(run, reset,
grad_bytes, bytes_moved, flops)``: ``run()`` does forward + backward once, ``reset()`` drops the
gradients, ``bytes_moved`` is the HBM traffic of the ideal fused kernel (inputs read once per
pass the divergence needs, gradient written once) and ``flops`` the matmul work, for the
achieved-bandwidth / FLOP-rate columns.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import fastdistill as fd

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TWO_PASS = ("forward_kl", "reverse_kl")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


# ---- naive references (what a trainer writes by hand) --------------------------------------------

def naive_distill(s, t, labels, divergence="forward_kl", beta=0.5, temperature=1.0,
                  hard_weight=0.0):
    """The usual hand-written loss: float32 log_softmax of both, the divergence, CE."""
    T = temperature
    lq = F.log_softmax(s.float() / T, -1)
    lp = F.log_softmax(t.float() / T, -1)
    if divergence == "forward_kl":
        loss = F.kl_div(lq, lp, log_target=True, reduction="batchmean")
    elif divergence == "reverse_kl":
        loss = F.kl_div(lp, lq, log_target=True, reduction="batchmean")
    elif divergence == "jsd":  # TRL's generalized_jsd_loss formulation
        lm = torch.logsumexp(torch.stack([lq + torch.log(torch.tensor(1 - beta)),
                                          lp + torch.log(torch.tensor(beta))]), 0)
        loss = (beta * F.kl_div(lm, lp, log_target=True, reduction="batchmean")
                + (1 - beta) * F.kl_div(lm, lq, log_target=True, reduction="batchmean"))
    elif divergence == "tvd":
        loss = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1).mean()
    else:
        raise ValueError(f"no naive reference for {divergence}")
    if hard_weight and labels is not None:
        loss = loss + hard_weight * F.cross_entropy(s.float(), labels)
    return loss


def naive_linear(h_s, w_s, h_t, w_t, labels, **kw):
    """Materialise both logit tensors, then the naive loss."""
    return naive_distill(h_s @ w_s.t(), h_t @ w_t.t(), labels, **kw)


# ---- providers -----------------------------------------------------------------------------------

def distill_providers(device: str) -> List[str]:
    names = []
    if device == "cuda":
        names += ["fastdistill-triton"]
        if fd.backends.check("cuda", torch.device("cuda"))[0]:
            names.append("fastdistill-cuda")
    else:
        if fd.backends.check("cpu", torch.device("cpu"))[0]:
            names.append("fastdistill-cpu")
    names += ["fastdistill-torch", "torch-eager", "torch-compile"]
    if device == "cuda" and liger_available():
        names.append("liger")
    return names


def _div_kw(spec):
    return dict(divergence=spec.get("divergence", "forward_kl"), beta=spec.get("beta", 0.5),
                temperature=spec.get("temperature", 1.0), hard_weight=spec.get("hard_weight", 0.0))


def _build_distill(spec):
    dev, dt = spec["device"], DTYPES[spec["dtype"]]
    N, V = spec["N"], spec["V"]
    g = torch.Generator(device=dev).manual_seed(0)
    s = (torch.randn(N, V, device=dev, generator=g) * 2).to(dt).requires_grad_()
    t = (torch.randn(N, V, device=dev, generator=g) * 2).to(dt)
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    kw = _div_kw(spec)
    p = spec["provider"]
    if p.startswith("fastdistill-"):
        backend = p.split("-", 1)[1]

        def fn():
            return fd.distill_loss(s, t, labels, backend=backend, **kw)
    elif p == "torch-eager":
        def fn():
            return naive_distill(s, t, labels, **kw)
    elif p == "torch-compile":
        compiled = torch.compile(naive_distill)

        def fn():
            return compiled(s, t, labels, **kw)
    elif p == "liger":
        fn = _liger_distill(s, t, labels, kw)
    else:
        raise ValueError(f"unknown provider {p!r} for op distill")

    def run():
        fn().backward()

    def reset():
        s.grad = None

    e = s.element_size()
    passes = 2 if kw["divergence"] in TWO_PASS else 3
    moved = N * V * (passes * 2 * e + e)
    return run, reset, N * V * e, moved, 0.0


def _liger_distill(s, t, labels, kw):
    """Liger-Kernel's losses take log-probabilities: the log_softmax is part of the cost."""
    T = kw["temperature"]
    if kw["divergence"] == "jsd":
        from liger_kernel.transformers import LigerJSD
        loss = LigerJSD(beta=kw["beta"])
    elif kw["divergence"] == "forward_kl":
        from liger_kernel.transformers import LigerKLDIVLoss
        loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        raise ValueError(f"Liger-Kernel has no {kw['divergence']}")
    if kw["divergence"] == "jsd":
        return lambda: loss(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1),
                            labels)
    return lambda: loss(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1))


def linear_providers(device: str) -> List[str]:
    names = ["gemm-floor", "fastdistill-chunked"]
    if device == "cuda":
        names.append("fastdistill-fused")
    names += ["torch-eager", "torch-compile"]
    if liger_available():
        names.append("liger-chunked")
        if device == "cuda":
            names.append("liger")
    return names


def _build_linear(spec):
    dev, dt = spec["device"], DTYPES[spec["dtype"]]
    N, V, D, Dt = spec["N"], spec["V"], spec["D"], spec.get("Dt", spec["D"])
    g = torch.Generator(device=dev).manual_seed(0)
    hs = torch.randn(N, D, device=dev, generator=g).to(dt).requires_grad_()
    ws = (torch.randn(V, D, device=dev, generator=g) * D ** -0.5).to(dt).requires_grad_()
    ht = torch.randn(N, Dt, device=dev, generator=g).to(dt)
    wt = (torch.randn(V, Dt, device=dev, generator=g) * Dt ** -0.5).to(dt)
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    kw = _div_kw(spec)
    sw = spec.get("soft_weight", 1.0)
    p = spec["provider"]
    e = hs.element_size()
    grad_bytes = (N * D + V * D) * e
    flops = 2.0 * N * V * (3 * D + Dt)
    if p == "gemm-floor":
        run, reset = _gemm_floor(hs, ws, ht, wt)
        return run, reset, grad_bytes, 0, flops
    if p in ("fastdistill-chunked", "fastdistill-fused"):
        mode = p.split("-")[1]

        def fn():
            return fd.linear_distill_loss(hs, ws, ht, wt, labels, soft_weight=sw, mode=mode,
                                          **kw)
    elif p in ("torch-eager", "torch-compile"):
        f = naive_linear if p == "torch-eager" else torch.compile(naive_linear)

        def fn():
            return _weighted_naive_linear(f, hs, ws, ht, wt, labels, sw, kw)
    elif p == "liger-chunked":  # Liger's torch.compile chunked loss (JSD with hard labels)
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        if kw["divergence"] != "jsd":
            raise ValueError("liger-chunked computes jsd only (use --divergence jsd)")
        loss = LigerFusedLinearJSDLoss(weight_hard_loss=kw["hard_weight"], weight_soft_loss=sw,
                                       beta=kw["beta"], temperature=kw["temperature"])

        def fn():
            return loss(hs, ws, ht, wt, labels)
    elif p == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD
        if kw["divergence"] != "jsd" or kw["hard_weight"]:
            raise ValueError("liger (LigerFusedLinearJSD) computes jsd without hard labels")
        loss = LigerFusedLinearJSD(jsd_beta=kw["beta"], temperature=kw["temperature"])

        def fn():
            return loss(hs, ws, ht, wt, labels)
    else:
        raise ValueError(f"unknown provider {p!r} for op linear")

    def run():
        fn().backward()

    def reset():
        hs.grad = None
        ws.grad = None

    return run, reset, grad_bytes, 0, flops


def _gemm_floor(hs, ws, ht, wt):
    """The four GEMMs of the linear loss alone, at its shapes and dtype, into buffers made once:
    student and teacher logits [N, V] (float32 outputs where torch has out_dtype for 16-bit
    CUDA inputs, as the chunked mode uses them; else the input dtype), grad_hidden = G W_s and
    grad_weight = G^T h_s with the logits buffer as G (in the input dtype). The time every
    linear row is compared with."""
    h, w = hs.detach(), ws.detach()
    N, V = h.shape[0], w.shape[0]
    z = torch.empty(N, V, dtype=h.dtype, device=h.device)
    z32 = None
    if h.is_cuda and h.dtype != torch.float32:
        try:
            torch.mm(h[:1], w[:1].t(), out_dtype=torch.float32,
                     out=torch.empty(1, 1, device=h.device))
            z32 = torch.empty(N, V, dtype=torch.float32, device=h.device)
        except (TypeError, RuntimeError):
            z32 = None
    g_h = torch.empty_like(h)
    g_w = torch.empty_like(w)

    def run():
        if z32 is not None:
            torch.mm(h, w.t(), out_dtype=torch.float32, out=z32)
            torch.mm(ht, wt.t(), out_dtype=torch.float32, out=z32)
        else:
            torch.mm(h, w.t(), out=z)
            torch.mm(ht, wt.t(), out=z)
        torch.mm(z, w, out=g_h)
        torch.mm(z.t(), h, out=g_w)

    return run, lambda: None


def _weighted_naive_linear(f, hs, ws, ht, wt, labels, soft_weight, kw):
    """soft_weight * divergence + hard_weight * CE, both on materialised logits."""
    out = soft_weight * f(hs, ws, ht, wt, labels, **dict(kw, hard_weight=0.0))
    if kw["hard_weight"]:
        out = out + kw["hard_weight"] * F.cross_entropy((hs @ ws.t()).float(), labels)
    return out


def feature_providers(device: str) -> List[str]:
    return [p for p in distill_providers(device) if p != "liger"]


def naive_feature(students, teachers):
    """Mean over pairs of the per-pair MSE, the obvious composition."""
    return sum((s.float() - t.float()).pow(2).mean() for s, t in zip(students, teachers)) / \
        len(students)


def _build_feature(spec):
    dev, dt = spec["device"], DTYPES[spec["dtype"]]
    N, D, P = spec["N"], spec["D"], spec.get("pairs", 4)
    g = torch.Generator(device=dev).manual_seed(0)
    s = [torch.randn(N, D, device=dev, generator=g).to(dt).requires_grad_() for _ in range(P)]
    t = [torch.randn(N, D, device=dev, generator=g).to(dt) for _ in range(P)]
    p = spec["provider"]
    if p.startswith("fastdistill-"):
        backend = p.split("-", 1)[1]
        crit = fd.FeatureDistillLoss(fd.LayerMap.explicit([(i, i) for i in range(P)], P, P),
                                     D, D, kind="mse", backend=backend)
        # hidden_states tuples: index 0 is the embedding output, layer i is index i + 1
        hs, ht = [s[0]] + s, [t[0]] + t

        def fn():
            return crit(hs, ht)
    elif p in ("torch-eager", "torch-compile"):
        f = naive_feature if p == "torch-eager" else torch.compile(naive_feature)

        def fn():
            return f(s, t)
    else:
        raise ValueError(f"unknown provider {p!r} for op feature")

    def run():
        fn().backward()

    def reset():
        for x in s:
            x.grad = None

    e = s[0].element_size()
    grad_bytes = P * N * D * e
    return run, reset, grad_bytes, P * N * D * 3 * e, 0.0


# ---- sparse (top-k) teachers against the dense one -----------------------------------------------

TOPK_KS = (8, 64, 256)


def topk_providers(device: str) -> List[str]:
    """The dense teacher, then stored top-k teachers of each K (topk_tail="bucket"), and the
    usual hand-written sparse loss (TRL's server-distillation formulation) at K = 64."""
    return (["fastdistill-dense"] + [f"fastdistill-topk{k}" for k in TOPK_KS]
            + ["torch-topk64"])


def naive_topk(s, idx, lp, labels, temperature=1.0):
    """Forward KL with a tail bucket as trainers write it: the full float32 log_softmax, a
    gather, the tail as log(1 - sum exp) on both sides."""
    lq = torch.log_softmax(s.float() / temperature, -1).gather(-1, idx.long())
    lpf = lp.float()

    def tail(x):
        ls = torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([x, torch.log(-torch.expm1(ls))], -1)

    lq, lpf = tail(lq), tail(lpf)
    return (lpf.exp() * (lpf - lq)).sum(-1).mean()


def _topk_k(provider: str) -> int:
    return int(provider.split("topk")[1])


def disk_bytes_per_token(spec: dict) -> float:
    """Bytes per token of the stored teacher: the dense logits in bf16 (V x 2), or the top-k as
    fastdistill.offline stores it (K x (4-byte index + 2-byte bf16 logprob) + the 4-byte input
    id; the per-sequence offsets and the shard header add well under a byte)."""
    p = spec["provider"]
    if "topk" in p:
        return 6.0 * _topk_k(p) + 4.0
    return 2.0 * spec["V"]


def _build_topk(spec):
    dev, dt = spec["device"], DTYPES[spec["dtype"]]
    N, V = spec["N"], spec["V"]
    T = spec.get("temperature", 1.0)
    g = torch.Generator(device=dev).manual_seed(0)
    s = (torch.randn(N, V, device=dev, generator=g) * 2).to(dt).requires_grad_()
    t = (torch.randn(N, V, device=dev, generator=g) * 2).to(dt)
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    p = spec["provider"]
    kw = dict(temperature=T, hard_weight=spec.get("hard_weight", 0.0))
    e = s.element_size()
    if p == "fastdistill-dense":
        def fn():
            return fd.distill_loss(s, t, labels, **kw)
        moved = N * V * (2 * 2 * e + e)
    elif p.startswith("fastdistill-topk") or p.startswith("torch-topk"):
        K = _topk_k(p)
        from fastdistill.offline import topk_logprobs
        idx, lp = topk_logprobs(t, K, T)  # the stored teacher, made once
        lp = lp.to(torch.bfloat16)
        del t
        if p.startswith("fastdistill"):
            def fn():
                return fd.distill_loss(s, None, labels, teacher_topk=(idx, lp),
                                       topk_tail=spec.get("topk_tail", "bucket"), **kw)
        else:
            def fn():
                return naive_topk(s, idx, lp, labels, T)
        moved = N * V * (2 * e + e) + N * K * 6
    else:
        raise ValueError(f"unknown provider {p!r} for op topk")

    def run():
        fn().backward()

    def reset():
        s.grad = None

    return run, reset, N * V * e, moved, 0.0


BUILDERS: Dict[str, Callable] = {"distill": _build_distill, "linear": _build_linear,
                                 "feature": _build_feature, "topk": _build_topk}
PROVIDERS: Dict[str, Callable[[str], List[str]]] = {"distill": distill_providers,
                                                    "linear": linear_providers,
                                                    "feature": feature_providers,
                                                    "topk": topk_providers}


def build(spec: dict):
    return BUILDERS[spec["op"]](spec)
