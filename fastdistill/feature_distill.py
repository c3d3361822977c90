"""FeatureDistillLoss: feature losses over several (student layer, teacher layer) pairs of
Hugging Face ``hidden_states`` tuples, with learned projections and an optional schedule.

Pairs compared directly (equal widths, no projection) of the same width and dtypes are
concatenated along the token dimension and go through ONE call of the fused feature kernel; each
projected pair goes through the chunked projection path of ``feature_loss``.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from fastdistill import _checks, backends, ops
from fastdistill._rows import reduction_scale
from fastdistill.feature import projected_feature_loss
from fastdistill import config
from fastdistill.config import FEATURE_KINDS
from fastdistill.layers import LayerMap, LayerSchedule

PROJECTION_INITS = ("identity", "orthogonal", "xavier", "default")

# fuse="auto" concatenates direct pairs only while each pair's student hidden state is at most
# this many bytes: the concatenation copies every pair (4 extra bytes moved per byte of student
# state: read + write of student and teacher) to save one launch per pair, which pays only for
# small states. CPU (bench/RESULTS.md, 4 fp32 pairs, one thread, CPU ms fused vs per pair):
# 0.43 vs 0.76 at 128 KiB, 0.67 vs 0.92 at 256 KiB (1.08 vs 0.89 in a noisier run), 2.6 vs
# 2.0 at 1 MiB, 27.6 vs 7.5 at 4 MiB. CUDA: estimated as launch overhead (~5 us) x bandwidth
# (~3 TB/s) / 4, not yet measured on a GPU.
FUSE_MAX_BYTES = {"cpu": 256 << 10, "cuda": 4 << 20}


def init_projection(linear: nn.Linear, init: str) -> nn.Linear:
    """Initialise ``linear`` (weight [Dt, Ds]) in place; the bias (if any) becomes 0 except for
    ``default``.

    - ``identity``: ``W = eye(Dt, Ds)`` (W[i, j] = 1 if i == j else 0): the identity for
      Ds == Dt; for Dt > Ds the student features fill the first Ds teacher coordinates and the
      rest are 0; for Dt < Ds the first Dt student features are kept (truncation).
    - ``orthogonal``: a random semi-orthogonal W (``nn.init.orthogonal_``): W W^T = I when
      Dt <= Ds, W^T W = I (norm preserving) when Dt >= Ds.
    - ``xavier``: ``nn.init.xavier_uniform_`` (U(-a, a), a = sqrt(6 / (Ds + Dt))).
    - ``default``: what ``nn.Linear`` does (kaiming uniform weight and uniform bias).

    Random inits draw from torch's global generator, like ``nn.Linear``.
    """
    if init == "default":
        return linear
    with torch.no_grad():
        if init == "identity":
            linear.weight.copy_(torch.eye(*linear.weight.shape))
        elif init == "orthogonal":
            nn.init.orthogonal_(linear.weight)
        elif init == "xavier":
            nn.init.xavier_uniform_(linear.weight)
        else:
            raise ValueError(f"projection_init must be one of {PROJECTION_INITS}, got {init!r}")
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


def _dims(name: str, dims, n: int) -> List[int]:
    """One width per layer from an int (every layer) or a sequence of n ints."""
    if isinstance(dims, numbers.Integral) and not isinstance(dims, bool):
        out = [int(dims)] * n
    elif isinstance(dims, Sequence) and not isinstance(dims, str):
        if len(dims) != n:
            raise ValueError(f"{name} must be an int or one width per layer ({n} layers), got "
                             f"{len(dims)} widths")
        out = list(dims)
        for d in out:
            if isinstance(d, bool) or not isinstance(d, numbers.Integral):
                raise TypeError(f"{name} entries must be ints, got {type(d).__name__}")
    else:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(dims).__name__}")
    if any(d < 1 for d in out):
        raise ValueError(f"{name} must be >= 1, got {dims!r}")
    return [int(d) for d in out]


class FeatureDistillLoss(nn.Module):
    """Weighted feature losses over layer pairs of two Hugging Face ``hidden_states`` tuples.

    ``FeatureDistillLoss(layer_map, student_dims, teacher_dims)(student_hidden_states,
    teacher_hidden_states, attention_mask=None, step=None)``

    Args:
        layer_map: a :class:`fastdistill.LayerMap`; layer ``i`` is ``hidden_states[i + 1]``
            (``hidden_states[0]``, the embedding output, is not used), so the tuples must have
            ``num_student_layers + 1`` and ``num_teacher_layers + 1`` entries.
        student_dims, teacher_dims: hidden width of every layer (an int) or one int per layer.
        kind: ``mse``, ``cosine`` or ``normalized_mse`` (see :func:`fastdistill.feature_loss`).
        weights: one positive float per pair (position in ``layer_map.pairs``); None is 1 each.
        normalize_weights: True divides by the sum of the ACTIVE pairs' weights (a weighted
            mean: the scale does not change when a schedule drops pairs); False gives the plain
            weighted sum.
        project: True: a learned ``nn.Linear(Ds, Dt)`` for each pair whose widths differ;
            equal-width pairs are compared directly. ``"all"``: a projection for every pair
            (square ones included). False: no projection; every pair needs Ds == Dt.
        projection_init: ``identity`` (default), ``orthogonal``, ``xavier`` or ``default``; see
            :func:`init_projection`. projection_bias: give the projections a bias (init 0).
        schedule: an optional :class:`fastdistill.LayerSchedule` over ``len(layer_map)`` pairs
            choosing the active pairs per step; its state is part of this module's state_dict.
        fuse: True concatenates the direct pairs of equal width and dtypes (and, for mean /
            sum, equal weight) along the tokens and computes them in one kernel call (one
            launch, at the cost of a copy of those hidden states; with the default equal
            weights all direct pairs of one width take one launch). False computes each pair
            in its own call (no copy). ``"auto"`` (default) fuses while each pair's student
            hidden state is at most ``FUSE_MAX_BYTES[device type]`` (256 KiB on CPU, 4 MiB on
            CUDA), where saving launches outweighs the copy.
        reduction: ``mean`` over selected tokens, ``sum``, or ``none`` (per token).
        backend: as for :func:`fastdistill.feature_loss`.

    Forward: ``student_hidden_states`` / ``teacher_hidden_states`` are tuples (or lists) of
    ``[..., D]`` float tensors (usually ``[B, T, D]``) with one leading shape; the teacher ones
    get no gradient. ``attention_mask`` ``[...]`` bool or integer (nonzero = token counts).
    ``step`` (int) picks the schedule's active pairs; None uses ``schedule.current_step``, which
    :meth:`step` advances (call it once per optimizer step); without a schedule every pair is
    active and ``step`` is ignored. The projections of inactive pairs get no gradient (under
    DistributedDataParallel that needs ``find_unused_parameters=True``).
    ``torch.compile(fullgraph=True)`` traces it whole: direct pairs are one custom op call per
    weight, projected pairs one ``fastdistill::projected_feature`` call each.

    Returns, with A the active pairs, ``c_p = w_p / sum_{q in A} w_q`` (normalize_weights) or
    ``w_p``, and ``L_p`` the :func:`fastdistill.feature_loss` of pair p (its projection applied)
    with this reduction: ``sum_{p in A} c_p L_p``: float32, 0-d or the leading shape for
    ``none``.
    """

    def __init__(self, layer_map: LayerMap, student_dims, teacher_dims, kind: str = "mse",
                 weights: Optional[Sequence[float]] = None, project=True,
                 projection_init: str = "identity", schedule: Optional[LayerSchedule] = None,
                 reduction: str = "mean", backend: str = "auto", *,
                 normalize_weights: bool = True, projection_bias: bool = True, fuse="auto"):
        super().__init__()
        if not isinstance(layer_map, LayerMap):
            raise TypeError(f"layer_map must be a fastdistill.LayerMap (LayerMap.uniform, .last "
                            f"or .explicit), got {type(layer_map).__name__}")
        if not isinstance(kind, str) or kind not in FEATURE_KINDS:
            raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
        if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got "
                             f"{reduction!r}")
        config.choice("backend", backend, config.BACKENDS)
        if not (project is True or project is False
                or (isinstance(project, str) and project == "all")):
            raise ValueError(f"project must be True, False or 'all', got {project!r}")
        if not isinstance(projection_init, str) or projection_init not in PROJECTION_INITS:
            raise ValueError(f"projection_init must be one of {PROJECTION_INITS}, got "
                             f"{projection_init!r}")
        P = len(layer_map)
        self.layer_map = layer_map
        self.student_dims = _dims("student_dims", student_dims, layer_map.num_student_layers)
        self.teacher_dims = _dims("teacher_dims", teacher_dims, layer_map.num_teacher_layers)
        self.weights = self._weights(weights, P)
        self.kind, self.reduction, self.backend = kind, reduction, backend
        if not (fuse is True or fuse is False or (isinstance(fuse, str) and fuse == "auto")):
            raise ValueError(f"fuse must be True, False or 'auto', got {fuse!r}")
        self.normalize_weights, self.fuse = bool(normalize_weights), fuse
        self.project, self.projection_init = project, projection_init
        if schedule is not None:
            if not isinstance(schedule, LayerSchedule):
                raise TypeError(f"schedule must be a fastdistill.LayerSchedule, got "
                                f"{type(schedule).__name__}")
            if schedule.num_pairs != P:
                raise ValueError(f"schedule has {schedule.num_pairs} pairs but layer_map has {P}")
        self.schedule = schedule
        # one projection per projected pair, keyed "s{s}_t{t}" so optimizers and state_dict see it
        self.projections = nn.ModuleDict()
        for s, t in layer_map.pairs:
            ds, dt = self.student_dims[s], self.teacher_dims[t]
            if project is False and ds != dt:
                raise ValueError(f"pair (student layer {s}, teacher layer {t}) has widths "
                                 f"{ds} -> {dt}; project=False needs equal widths (use "
                                 "project=True for a learned projection)")
            if project == "all" or ds != dt:
                self.projections[self._key(s, t)] = init_projection(
                    nn.Linear(ds, dt, bias=projection_bias), projection_init)

    @staticmethod
    def _key(s: int, t: int) -> str:
        return f"s{s}_t{t}"

    @staticmethod
    def _weights(weights, P: int) -> List[float]:
        if weights is None:
            return [1.0] * P
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a sequence of floats (one per pair), got "
                            f"{type(weights).__name__}")
        if len(weights) != P:
            raise ValueError(f"weights must have one entry per pair ({P}), got {len(weights)}")
        out = []
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real):
                raise TypeError(f"weights entries must be floats, got {type(w).__name__}")
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"weights must be positive and finite, got {list(weights)}")
            out.append(float(w))
        return out

    def projection(self, pair: int) -> Optional[nn.Linear]:
        """The projection of pair position ``pair``, or None when it is compared directly."""
        key = self._key(*self.layer_map.pairs[pair])
        return self.projections[key] if key in self.projections else None

    def active_pairs(self, step=None) -> tuple:
        """Positions (into ``layer_map.pairs``) of the pairs that count at ``step``."""
        if self.schedule is None:
            return tuple(range(len(self.layer_map)))
        return self.schedule.active(step)

    def step(self, n: int = 1) -> None:
        """Advance the schedule's step counter (no-op without a schedule)."""
        if self.schedule is not None:
            self.schedule.step(n)

    def get_extra_state(self):
        return {"schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "pairs": [list(p) for p in self.layer_map.pairs]}

    def set_extra_state(self, state) -> None:
        sched = state.get("schedule") if isinstance(state, dict) else None
        pairs = state.get("pairs") if isinstance(state, dict) else None
        if pairs is not None and [tuple(p) for p in pairs] != list(self.layer_map.pairs):
            raise ValueError(f"the state_dict is for the layer pairs {[tuple(p) for p in pairs]}, "
                             f"this FeatureDistillLoss has {list(self.layer_map.pairs)}")
        if (sched is None) != (self.schedule is None):
            raise ValueError("the state_dict's schedule state does not match this "
                             "FeatureDistillLoss: one has a schedule and the other does not")
        if sched is not None:
            self.schedule.load_state_dict(sched)

    # ---- forward ---------------------------------------------------------------------------

    def _states(self, name: str, hs, n_layers: int, dims: List[int], layers, lead):
        if isinstance(hs, torch.Tensor) or not isinstance(hs, (tuple, list)):
            raise TypeError(f"{name} must be a tuple or list of [..., D] tensors (a Hugging Face "
                            f"output's hidden_states), got {type(hs).__name__}")
        if len(hs) != n_layers + 1:
            raise ValueError(f"{name} must have {n_layers + 1} entries (the embedding output "
                             f"and {n_layers} layers, as Hugging Face returns them), got "
                             f"{len(hs)}")
        out = {}
        for i in layers:
            x = _checks.tensor(f"{name}[{i + 1}]", hs[i + 1])
            if x.shape[-1] != dims[i]:
                raise ValueError(f"{name}[{i + 1}] (layer {i}) has width {x.shape[-1]} but the "
                                 f"loss was built for {dims[i]}")
            if lead is None:
                lead = x.shape[:-1]
            elif x.shape[:-1] != lead:
                raise ValueError(f"{name}[{i + 1}] has leading shape {tuple(x.shape[:-1])}, "
                                 f"expected {tuple(lead)} like the other hidden states")
            out[i] = x
        return out, lead

    def forward(self, student_hidden_states, teacher_hidden_states, attention_mask=None, *,
                step=None) -> torch.Tensor:
        lm = self.layer_map
        active = self.active_pairs(step)
        pairs = [lm.pairs[p] for p in active]
        s_hs, lead = self._states("student_hidden_states", student_hidden_states,
                                  lm.num_student_layers, self.student_dims,
                                  sorted({s for s, _ in pairs}), None)
        t_hs, _ = self._states("teacher_hidden_states", teacher_hidden_states,
                               lm.num_teacher_layers, self.teacher_dims,
                               sorted({t for _, t in pairs}), lead)
        mask = self._mask(attention_mask, lead)
        names = [f"student_hidden_states[{i + 1}]" for i in s_hs] \
            + [f"teacher_hidden_states[{i + 1}]" for i in t_hs] + ["attention_mask"]
        device = _checks.same_device(names, list(s_hs.values()) + list(t_hs.values()) + [mask])
        name = backends.resolve(self.backend, device)

        w = [self.weights[p] for p in active]
        total = sum(w) if self.normalize_weights else 1.0
        coef = {p: wp / total for p, wp in zip(active, w)}

        code = FEATURE_KINDS.index(self.kind)
        m = mask.reshape(-1) if mask is not None else None
        out = None
        groups: Dict[tuple, list] = {}
        for p in active:
            s, t = lm.pairs[p]
            proj = self.projection(p)
            if proj is not None:
                term = projected_feature_loss(s_hs[s], t_hs[t].detach(), proj, code, m,
                                              self.reduction, name, coef=coef[p])
                out = term if out is None else out + term
            elif not self._fuse(s_hs[s]):
                groups[(p,)] = [p]
            else:
                # a scalar reduction folds the pair's coefficient into the kernel's gradient
                # scale (one rounding of a 16-bit gradient), so unequal weights split groups
                c = coef[p] if self.reduction != "none" else None
                groups.setdefault((s_hs[s].shape[-1], s_hs[s].dtype, t_hs[t].dtype, c),
                                  []).append(p)
        for members in groups.values():
            term = self._direct([s_hs[lm.pairs[p][0]] for p in members],
                                [t_hs[lm.pairs[p][1]].detach() for p in members],
                                mask, [coef[p] for p in members], name, lead)
            out = term if out is None else out + term
        return out

    def _fuse(self, student: torch.Tensor) -> bool:
        if self.fuse != "auto":
            return self.fuse
        limit = FUSE_MAX_BYTES.get(student.device.type, FUSE_MAX_BYTES["cuda"])
        return student.numel() * student.element_size() <= limit

    @staticmethod
    def _mask(attention_mask, lead) -> Optional[torch.Tensor]:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a bool or integer tensor, got "
                            f"{type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be a bool or integer tensor (nonzero = the "
                            f"token counts), got {attention_mask.dtype}")
        if attention_mask.shape != lead:
            raise ValueError(f"attention_mask must have the hidden states' leading shape "
                             f"{tuple(lead)}, got {tuple(attention_mask.shape)}")
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0

    def _direct(self, students, teachers, mask, coefs, backend, lead) -> torch.Tensor:
        """``sum_p coefs[p] * feature_loss(students[p], teachers[p])`` in one kernel call over
        the pairs concatenated along the tokens. With equal coefficients (always the case for
        mean / sum, see forward) the coefficient and the mean's 1 / #tokens are folded into the
        kernel's gradient scale; otherwise (``none``) the kernel returns per-token losses and
        backward scales each pair's gradient rows by coefficient * grad_output."""
        k = len(students)
        s2 = torch.cat([_checks.rows2d(x) for x in students]) if k > 1 \
            else _checks.rows2d(students[0])
        t2 = torch.cat([_checks.rows2d(x) for x in teachers]) if k > 1 \
            else _checks.rows2d(teachers[0])
        N = s2.shape[0] // k
        m = None
        if mask is not None:
            m = mask.reshape(-1)
            m = m.repeat(k) if k > 1 else m
        # 1 / #selected tokens of ONE pair (the mask is shared), 1 for sum / none
        inv_n = reduction_scale(self.reduction, N,
                                mask.reshape(-1) if mask is not None else None, s2.device)
        code = FEATURE_KINDS.index(self.kind)
        need_grad = torch.is_grad_enabled() and s2.requires_grad
        if self.reduction != "none" and all(c == coefs[0] for c in coefs):
            loss, _ = ops.feature(s2, t2, m, inv_n * coefs[0], code, False, backend, need_grad)
            return loss
        one = torch.ones((), dtype=torch.float32, device=s2.device)
        rows, _ = ops.feature(s2, t2, m, one, code, True, backend, need_grad)
        c = torch.tensor(coefs, dtype=torch.float32, device=s2.device)
        per_token = (rows.view(k, N) * c[:, None]).sum(0)
        if self.reduction == "none":
            return per_token.reshape(lead)
        return per_token.sum() * inv_n

    def extra_repr(self) -> str:
        return (f"layer_map={self.layer_map!r}, kind={self.kind!r}, reduction="
                f"{self.reduction!r}, project={self.project!r}, "
                f"normalize_weights={self.normalize_weights}, fuse={self.fuse!r}")
