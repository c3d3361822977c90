"""make_student: a smaller Hugging Face causal LM initialised from its teacher.

    student, layer_map = fd.make_student(teacher, num_layers=4)                   # fewer layers
    student, layer_map = fd.make_student(teacher, num_layers=4, hidden_size=256)  # and narrower

The student has the teacher's architecture (its class and config, with fewer layers and, when
asked, a smaller hidden size). Initialisation, as DistilBERT did, from the teacher:

* layers: student layer ``i`` is a copy of teacher layer ``t_i``, with ``t_i`` the teacher
  layer that ``fastdistill.LayerMap.uniform(num_layers, teacher_layers)`` pairs it with (the
  last layer of each block of consecutive teacher layers, so the final layer is always kept),
  or the ``layers=`` given. The returned ``LayerMap`` pairs exactly these layers, ready for
  ``fastdistill.FeatureDistillLoss`` / ``DistillConfig(layer_map=...)``.
* embeddings, final norm, lm_head (tied or not): copied.
* a smaller hidden size ``d < D``: every weight is mapped into a ``d``-dimensional subspace of
  the teacher's residual stream with one orthonormal basis ``P`` (``[D, d]``): the
  input-embedding matrix's top-``d`` right singular vectors (``projection="svd"``, a truncated
  SVD of the embeddings: the subspace that keeps the most of them) or the first ``d``
  coordinates (``projection="truncate"``). A weight reading the residual stream becomes
  ``W P``, one writing it ``P^T W`` (embeddings, positional embeddings and lm_head: ``E P``),
  biases on the stream ``P^T b``, and norm scales ``diag(P^T diag(g) P)``. With ``d = D`` and an
  RMSNorm model this is an exact change of basis. The attention heads and MLP keep the
  teacher's widths (``head_dim`` is pinned) where the architecture allows; where the head size
  follows the hidden size (GPT-2), each ``D``-wide block of the attention (q, k, v) is mapped
  with the same ``P``. Any other dimension changed through ``config_overrides`` is initialised
  by truncation (the leading entries).
"""

from __future__ import annotations

import copy
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from fastdistill.layers import LayerMap

PROJECTIONS = ("svd", "truncate")


def _pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def _layer_list(model: nn.Module, n: int) -> Tuple[str, nn.ModuleList]:
    """The ModuleList of the transformer blocks (the one of length num_hidden_layers holding
    the most parameters)."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[2]:
                best = (name, m, size)
    if best is None:
        raise TypeError(f"could not find the {n} transformer blocks of {type(model).__name__} "
                        "(an nn.ModuleList of num_hidden_layers modules)")
    return best[0], best[1]


def _basis(teacher: nn.Module, D: int, d: int, projection: str) -> torch.Tensor:
    """[D, d] float64 orthonormal columns."""
    if projection == "truncate":
        return torch.eye(D, dtype=torch.float64)[:, :d]
    E = teacher.get_input_embeddings().weight.detach().to(torch.float64)
    # right singular vectors of E = eigenvectors of E^T E, largest first
    evals, evecs = torch.linalg.eigh(E.t() @ E)
    P = evecs[:, torch.argsort(evals, descending=True)[:d]]
    # a deterministic sign: each column's largest entry positive
    idx = P.abs().argmax(0)
    return P * torch.sign(P[idx, torch.arange(d)])


def _map_param(name, t: torch.Tensor, shape, D, d, P, is_norm) -> torch.Tensor:
    """The student value of a teacher parameter of another shape (see the module doc). Every
    axis on the residual stream (a multiple of D wide in the teacher and the same multiple of d
    in the student) is contracted with P block by block: W P for a weight reading the stream,
    P^T W for one writing it, whichever layout (nn.Linear [out, in], GPT-2's Conv1D [in, out])
    the weight has. Other changed axes are truncated."""
    x = t.detach().to(torch.float64)
    if x.dim() > 2:
        raise TypeError(f"cannot map parameter {name} of shape {tuple(x.shape)}")
    for axis in range(x.dim()):
        n_t, n_s = x.shape[axis], shape[axis]
        if n_t == n_s:
            continue
        if n_t % D == 0 and n_s % d == 0 and n_t // D == n_s // d:
            blocks = x.split(D, dim=axis)
            if x.dim() == 1:
                mapped = [((P * P).t() if is_norm else P.t()) @ b for b in blocks]
            else:
                mapped = [P.t() @ b if axis == 0 else b @ P for b in blocks]
            x = torch.cat(mapped, dim=axis)
        else:
            x = x.narrow(axis, 0, n_s)
    return x


def make_student(teacher: nn.Module, num_layers: int, hidden_size: Optional[int] = None, *,
                 layers: Optional[Sequence[int]] = None, projection: str = "svd",
                 **config_overrides) -> Tuple[nn.Module, LayerMap]:
    """A student for a Hugging Face causal LM, initialised from it.

    Args:
        teacher: a ``transformers`` causal LM (Llama, Qwen2, Mistral, GPT-2 and the like: a
            ``PreTrainedModel`` with ``config.num_hidden_layers``). Not modified.
        num_layers: the student's number of transformer blocks (1 .. the teacher's).
        hidden_size: the student's width (default: the teacher's; at most the teacher's).
        layers: the teacher layers the student's are copied from (``num_layers`` increasing
            indices); default: those of ``LayerMap.uniform(num_layers, teacher_layers)``.
        projection: ``"svd"`` or ``"truncate"``: the subspace a smaller ``hidden_size`` keeps
            (see the module docstring).
        config_overrides: more student-config changes (e.g. ``intermediate_size``).

    Returns:
        ``(student, layer_map)``: the student (the teacher's class, dtype and device, in train
        mode) and the ``LayerMap`` pairing each student layer with the teacher layer it was
        copied from.
    """
    if not isinstance(teacher, nn.Module) or not hasattr(teacher, "config"):
        raise TypeError(f"teacher must be a Hugging Face PreTrainedModel (with a config), got "
                        f"{type(teacher).__name__}")
    cfg = teacher.config
    Lt = getattr(cfg, "num_hidden_layers", None)
    D = getattr(cfg, "hidden_size", None)
    if not isinstance(Lt, int) or not isinstance(D, int):
        raise TypeError(f"teacher.config must have num_hidden_layers and hidden_size "
                        f"({type(cfg).__name__} has not)")
    Ls = _pos_int("num_layers", num_layers)
    if Ls > Lt:
        raise ValueError(f"num_layers must be at most the teacher's {Lt} layers, got {Ls}")
    d = D if hidden_size is None else _pos_int("hidden_size", hidden_size)
    if d > D:
        raise ValueError(f"hidden_size must be at most the teacher's {D}, got {d}")
    if not isinstance(projection, str) or projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if layers is None:
        layer_map = LayerMap.uniform(Ls, Lt)
    else:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError(f"layers must be a sequence of teacher layer indices, got "
                            f"{type(layers).__name__}")
        if len(layers) != Ls:
            raise ValueError(f"layers must have num_layers={Ls} entries, got {len(layers)}")
        if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in layers):
            raise TypeError(f"layers must hold ints, got {list(layers)}")
        if list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= Lt:
            raise ValueError(f"layers must be strictly increasing indices in [0, {Lt}), got "
                             f"{list(layers)}")
        layer_map = LayerMap.explicit([(i, int(t)) for i, t in enumerate(layers)], Ls, Lt)
    picks = [t for _, t in layer_map.pairs]

    s_cfg = copy.deepcopy(cfg)
    s_cfg.num_hidden_layers = Ls
    if d != D:
        heads = getattr(cfg, "num_attention_heads", None)
        if getattr(cfg, "head_dim", None) is not None or (
                heads and hasattr(s_cfg, "num_key_value_heads")):
            # keep the attention's width: the head size stays the teacher's
            s_cfg.head_dim = getattr(cfg, "head_dim", None) or D // heads
        if hasattr(cfg, "n_inner") and cfg.n_inner is None:  # GPT-2: MLP width from n_embd
            s_cfg.n_inner = 4 * D
        s_cfg.hidden_size = d
    for k, v in config_overrides.items():
        if not hasattr(s_cfg, k):
            raise ValueError(f"config_overrides: {type(cfg).__name__} has no option {k!r}")
        setattr(s_cfg, k, v)
    if hasattr(s_cfg, "layer_types") and isinstance(getattr(s_cfg, "layer_types"), list):
        s_cfg.layer_types = [cfg.layer_types[t] for t in picks]

    param = next(teacher.parameters())
    student = type(teacher)(s_cfg).to(device=param.device, dtype=param.dtype)

    t_name, t_layers = _layer_list(teacher, Lt)
    s_name, s_layers = _layer_list(student, Ls)
    P = _basis(teacher, D, d, projection) if d != D else None
    norm_params = {f"{n}.{pn}" if n else pn for n, m in teacher.named_modules()
                   if "norm" in type(m).__name__.lower() or "LayerNorm" in type(m).__name__
                   for pn, _ in m.named_parameters(recurse=False)}
    t_state = dict(teacher.named_parameters(remove_duplicate=False))
    prefix = t_name + "."
    with torch.no_grad():
        for name, p in student.named_parameters(remove_duplicate=False):
            src = name
            if name.startswith(prefix):
                rest = name[len(prefix):]
                i, tail = rest.split(".", 1)
                src = f"{prefix}{picks[int(i)]}.{tail}"
            if src not in t_state:
                raise RuntimeError(f"no teacher parameter for the student's {name}")
            t = t_state[src]
            if t.shape == p.shape:
                p.copy_(t)
            elif P is None:
                p.copy_(_map_param(src, t, p.shape, D, D, torch.eye(D, dtype=torch.float64),
                                   src in norm_params).to(p.dtype))
            else:
                p.copy_(_map_param(src, t, p.shape, D, d, P, src in norm_params).to(p.dtype))
    student.train()
    return student, layer_map
