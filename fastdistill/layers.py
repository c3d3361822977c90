"""Which student layer learns from which teacher layer, and which of those pairs are active.

Layer indices count transformer blocks from 0: layer ``i`` is the output of block ``i``, that is
``hidden_states[i + 1]`` of a Hugging Face model called with ``output_hidden_states=True``
(``hidden_states[0]`` is the embedding output and is not a layer here). A model with L blocks
has layers ``0 .. L-1`` and returns L + 1 hidden states.

:class:`LayerMap` holds the (student layer, teacher layer) pairs. A schedule
(:class:`ProgressiveLayerDrop`, :class:`StochasticLayerDrop`) says which of those pairs are
active at a training step; it refers to pairs by their position in ``LayerMap.pairs``.
"""

from __future__ import annotations

import numbers
from typing import Dict, Iterable, Sequence, Tuple

Pair = Tuple[int, int]


def _int(name: str, x, lo=0) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return int(x)


class LayerMap:
    """An ordered, validated list of ``(student_layer, teacher_layer)`` pairs.

    Build one with :meth:`uniform`, :meth:`last` or :meth:`explicit` (the constructor is
    :meth:`explicit`). ``pairs`` is a tuple of ``(s, t)`` int tuples with ``0 <= s < Ls`` and
    ``0 <= t < Lt``; a pair may not repeat, but a layer may appear in several pairs.
    """

    def __init__(self, pairs: Iterable[Sequence[int]], num_student_layers: int,
                 num_teacher_layers: int):
        Ls = _int("num_student_layers", num_student_layers, 1)
        Lt = _int("num_teacher_layers", num_teacher_layers, 1)
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
            raise TypeError(f"pairs must be a sequence of (student_layer, teacher_layer) pairs, "
                            f"got {type(pairs).__name__}")
        out = []
        for i, p in enumerate(pairs):
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2:
                raise ValueError(f"pairs[{i}] must be a (student_layer, teacher_layer) pair of "
                                 f"ints, got {p!r}")
            s = _int(f"pairs[{i}] student layer", p[0], None)
            t = _int(f"pairs[{i}] teacher layer", p[1], None)
            if not 0 <= s < Ls:
                raise ValueError(f"pairs[{i}] = {(s, t)}: student layer {s} is out of range "
                                 f"[0, {Ls}) (num_student_layers={Ls}; layer i is "
                                 "hidden_states[i + 1])")
            if not 0 <= t < Lt:
                raise ValueError(f"pairs[{i}] = {(s, t)}: teacher layer {t} is out of range "
                                 f"[0, {Lt}) (num_teacher_layers={Lt}; layer i is "
                                 "hidden_states[i + 1])")
            if (s, t) in out:
                raise ValueError(f"pairs[{i}] = {(s, t)} repeats pairs[{out.index((s, t))}]; "
                                 "each (student_layer, teacher_layer) pair may appear once")
            out.append((s, t))
        if not out:
            raise ValueError("pairs must hold at least one (student_layer, teacher_layer) pair")
        self.pairs: Tuple[Pair, ...] = tuple(out)
        self.num_student_layers = Ls
        self.num_teacher_layers = Lt

    @classmethod
    def explicit(cls, pairs: Iterable[Sequence[int]], num_student_layers: int,
                 num_teacher_layers: int) -> "LayerMap":
        """The given pairs, in the given order, validated against the layer counts."""
        return cls(pairs, num_student_layers, num_teacher_layers)

    @classmethod
    def uniform(cls, num_student_layers: int, num_teacher_layers: int) -> "LayerMap":
        """Every student layer ``i`` learns from teacher layer ``round((i+1) * Lt / Ls) - 1``.

        The rounding is half up, computed exactly in integers:
        ``t = floor((i+1) * Lt / Ls + 1/2) - 1 = (2 (i+1) Lt + Ls) // (2 Ls) - 1``; e.g. Ls=4,
        Lt=6 gives teacher layers 1, 2, 4, 5 (Python's ``round`` would give 1, 2, 3, 5). The last
        student layer always meets the last teacher layer, and the teacher layers are distinct.
        Needs ``Ls <= Lt`` (otherwise several student layers would share teacher layers and the
        first ones could fall before layer 0: use :meth:`explicit`).
        """
        Ls = _int("num_student_layers", num_student_layers, 1)
        Lt = _int("num_teacher_layers", num_teacher_layers, 1)
        if Ls > Lt:
            raise ValueError(f"LayerMap.uniform needs num_student_layers <= num_teacher_layers, "
                             f"got {Ls} > {Lt}; use LayerMap.explicit for a deeper student")
        return cls([(i, (2 * (i + 1) * Lt + Ls) // (2 * Ls) - 1) for i in range(Ls)], Ls, Lt)

    @classmethod
    def last(cls, k: int, num_student_layers: int, num_teacher_layers: int) -> "LayerMap":
        """The last ``k`` student layers learn from the last ``k`` teacher layers, in order:
        ``(Ls - k + j, Lt - k + j)`` for ``j = 0 .. k-1``. Needs ``1 <= k <= min(Ls, Lt)``."""
        Ls = _int("num_student_layers", num_student_layers, 1)
        Lt = _int("num_teacher_layers", num_teacher_layers, 1)
        k = _int("k", k, 1)
        if k > min(Ls, Lt):
            raise ValueError(f"k must be in [1, min(num_student_layers, num_teacher_layers)] = "
                             f"[1, {min(Ls, Lt)}], got {k}")
        return cls([(Ls - k + j, Lt - k + j) for j in range(k)], Ls, Lt)

    @property
    def student_layers(self) -> Tuple[int, ...]:
        return tuple(s for s, _ in self.pairs)

    @property
    def teacher_layers(self) -> Tuple[int, ...]:
        return tuple(t for _, t in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def __getitem__(self, i) -> Pair:
        return self.pairs[i]

    def __eq__(self, other) -> bool:
        return (isinstance(other, LayerMap) and self.pairs == other.pairs
                and self.num_student_layers == other.num_student_layers
                and self.num_teacher_layers == other.num_teacher_layers)

    def __hash__(self) -> int:
        return hash((self.pairs, self.num_student_layers, self.num_teacher_layers))

    def __repr__(self) -> str:
        return (f"LayerMap({list(self.pairs)}, num_student_layers={self.num_student_layers}, "
                f"num_teacher_layers={self.num_teacher_layers})")


# ---- schedules ---------------------------------------------------------------------------------

def _num_pairs(x) -> int:
    if isinstance(x, LayerMap):
        return len(x)
    return _int("num_pairs", x, 1)


def _progress(step: int, start: int, total: int) -> Tuple[int, int]:
    """Elapsed steps of the window clamped to [0, total], as (num, den): f = num / den."""
    return min(max(step - start, 0), total), total


class LayerSchedule:
    """Base of the schedules: ``active(step)`` gives the positions (into ``LayerMap.pairs``) of
    the pairs that count at ``step``, sorted ascending; it depends on ``step`` and the
    constructor arguments only, never on earlier calls.

    A schedule also carries a step counter, ``current_step`` (starts at 0), advanced by
    :meth:`step` like a learning-rate scheduler and used when ``active`` gets no step.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the counter and the
    arguments.
    """

    _ARGS: Tuple[str, ...] = ()

    def __init__(self, num_pairs: int):
        self.num_pairs = _num_pairs(num_pairs)
        self.current_step = 0

    def active(self, step=None) -> Tuple[int, ...]:
        step = self.current_step if step is None else _int("step", step)
        return self._active(step)

    def _active(self, step: int) -> Tuple[int, ...]:
        raise NotImplementedError

    def step(self, n: int = 1) -> None:
        """Advance the counter by ``n`` steps (call once per optimizer step)."""
        self.current_step += _int("n", n)

    def state_dict(self) -> Dict[str, object]:
        state = {"type": type(self).__name__, "num_pairs": self.num_pairs,
                 "current_step": self.current_step}
        state.update({k: getattr(self, k) for k in self._ARGS})
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state is from a {state.get('type')}, not a "
                             f"{type(self).__name__}")
        want = {"type", "num_pairs", "current_step", *self._ARGS}
        if set(state) != want:
            raise ValueError(f"state must have the keys {sorted(want)} of a "
                             f"{type(self).__name__}.state_dict(), got {sorted(state)}")
        if state["num_pairs"] != self.num_pairs:
            raise ValueError(f"state is for {state['num_pairs']} layer pairs, this schedule has "
                             f"{self.num_pairs}: a schedule saved for another layer map would "
                             "leave pairs that never train")
        kwargs = {k: state[k] for k in self._ARGS}
        type(self).__init__(self, state["num_pairs"], **kwargs)  # re-validates the arguments
        self.current_step = _int("current_step", state["current_step"])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._ARGS)
        return f"{type(self).__name__}(num_pairs={self.num_pairs}, {args})"


class ProgressiveLayerDrop(LayerSchedule):
    """From all pairs down to the ``keep`` subset, dropping pairs one at a time (or in stages)
    over ``total_steps`` steps starting at ``start_step``.

    Args:
        num_pairs: the number of pairs (``len(layer_map)``), or the LayerMap itself.
        keep: the pairs active at the end: an int k (the last k positions,
            ``num_pairs - k .. num_pairs - 1``: for uniform / last maps, the deepest layers), or
            a sequence of positions.
        total_steps: length of the dropping window (>= 1).
        start_step: the first step of the window; before it every pair is active.
        stages: None drops the pairs one at a time, evenly spread (linear); an int S drops them
            in S equal stages (step-wise).
        drop_order: the dropped positions (all pairs not in ``keep``) in the order they leave;
            None is ascending position (shallowest first for uniform / last maps).

    With D dropped pairs, f = clamp((step - start_step) / total_steps, 0, 1) and S = stages or
    D, the first ``n(step) = floor(D * floor(S * f) / S)`` pairs of ``drop_order`` are inactive
    (computed in integers). Linear example: D = 3, total_steps = 300: one more pair leaves at
    start_step + 100, + 200 and + 300.
    """

    _ARGS = ("keep", "total_steps", "start_step", "stages", "drop_order")

    def __init__(self, num_pairs, keep, total_steps: int, *, start_step: int = 0, stages=None,
                 drop_order=None):
        super().__init__(num_pairs)
        P = self.num_pairs
        if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
            if not 1 <= keep <= P:
                raise ValueError(f"keep must be in [1, num_pairs={P}] when an int, got {keep}")
            kept = tuple(range(P - int(keep), P))
        else:
            kept = self._positions("keep", keep)
            if not kept:
                raise ValueError("keep must name at least one pair")
        self.keep = kept
        self.total_steps = _int("total_steps", total_steps, 1)
        self.start_step = _int("start_step", start_step)
        dropped = [i for i in range(P) if i not in kept]
        if drop_order is None:
            order = tuple(dropped)
        else:
            order = self._positions("drop_order", drop_order, sort=False)
            if sorted(order) != dropped:
                raise ValueError(f"drop_order must list exactly the pairs not in keep "
                                 f"({dropped}) in the order they leave, got {list(order)}")
        self.drop_order = order
        self.stages = None if stages is None else _int("stages", stages, 1)

    def _positions(self, name, xs, sort=True) -> Tuple[int, ...]:
        if isinstance(xs, (str, bytes)) or not isinstance(xs, Iterable):
            raise TypeError(f"{name} must be a sequence of pair positions, got "
                            f"{type(xs).__name__}")
        out = [_int(f"{name} entry", x) for x in xs]
        for x in out:
            if x >= self.num_pairs:
                raise ValueError(f"{name} entry {x} is out of range [0, {self.num_pairs}) "
                                 "(positions in LayerMap.pairs)")
        if len(set(out)) != len(out):
            raise ValueError(f"{name} has repeated positions: {out}")
        return tuple(sorted(out)) if sort else tuple(out)

    def num_dropped(self, step: int) -> int:
        D = len(self.drop_order)
        S = self.stages or max(D, 1)
        num, den = _progress(step, self.start_step, self.total_steps)
        return (D * ((S * num) // den)) // S

    def _active(self, step: int) -> Tuple[int, ...]:
        gone = set(self.drop_order[:self.num_dropped(step)])
        return tuple(i for i in range(self.num_pairs) if i not in gone)


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele et al.): a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def uniform_draw(seed: int, step: int, position: int) -> float:
    """The schedule's uniform number in [0, 1) for (seed, step, pair position):
    ``h = mix(mix(mix(seed) ^ step) ^ position)``, ``u = (h >> 11) / 2^53`` with mix the
    SplitMix64 finaliser; a pure function, so it does not depend on call history."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ (step & _M64)) ^ (position & _M64))
    return (h >> 11) * (1.0 / (1 << 53))


class StochasticLayerDrop(LayerSchedule):
    """Each pair is active at a step with a keep probability that decays linearly from 1 to
    ``final_keep_prob`` over ``total_steps`` steps from ``start_step``; the draws are
    deterministic for a given (seed, step).

    Args:
        num_pairs: the number of pairs (``len(layer_map)``), or the LayerMap itself.
        final_keep_prob: in [0, 1], one float for every pair or one per pair (e.g. higher for
            the deeper layers).
        total_steps: length of the decay (>= 1); start_step: where it starts.
        seed: a non-negative int.
        min_active: at least this many pairs are active at every step (1 by default).

    At step s, with f = clamp((s - start_step) / total_steps, 0, 1), pair j is active when
    ``u_j < p_j = 1 - (1 - final_keep_prob_j) * f``, u_j = :func:`uniform_draw` (seed, s, j).
    When fewer than ``min_active`` pairs pass, the inactive ones with the smallest ``u_j - p_j``
    (ties: lower position) are added.
    """

    _ARGS = ("final_keep_prob", "total_steps", "start_step", "seed", "min_active")

    def __init__(self, num_pairs, final_keep_prob, total_steps: int, *, start_step: int = 0,
                 seed: int = 0, min_active: int = 1):
        super().__init__(num_pairs)
        P = self.num_pairs
        scalar = isinstance(final_keep_prob, numbers.Real) and not isinstance(final_keep_prob,
                                                                                bool)
        if scalar:
            probs = (float(final_keep_prob),) * P
        elif isinstance(final_keep_prob, Sequence) and not isinstance(final_keep_prob, str):
            if len(final_keep_prob) != P:
                raise ValueError(f"final_keep_prob must have one entry per pair ({P}), got "
                                 f"{len(final_keep_prob)}")
            probs = tuple(float(p) for p in final_keep_prob)
        else:
            raise TypeError(f"final_keep_prob must be a float or a sequence of floats, got "
                            f"{type(final_keep_prob).__name__}")
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"final_keep_prob must be in [0, 1], got {final_keep_prob!r}")
        self.final_keep_prob = probs[0] if scalar else probs
        self._probs = probs
        self.total_steps = _int("total_steps", total_steps, 1)
        self.start_step = _int("start_step", start_step)
        self.seed = _int("seed", seed)
        self.min_active = _int("min_active", min_active, 1)
        if self.min_active > P:
            raise ValueError(f"min_active must be in [1, num_pairs={P}], got {min_active}")

    def keep_prob(self, step: int) -> Tuple[float, ...]:
        num, den = _progress(_int("step", step), self.start_step, self.total_steps)
        f = num / den
        return tuple(1.0 - (1.0 - p) * f for p in self._probs)

    def _active(self, step: int) -> Tuple[int, ...]:
        probs = self.keep_prob(step)
        margin = [uniform_draw(self.seed, step, j) - p for j, p in enumerate(probs)]
        on = [j for j in range(self.num_pairs) if margin[j] < 0]
        if len(on) < self.min_active:
            off = sorted((j for j in range(self.num_pairs) if margin[j] >= 0),
                         key=lambda j: (margin[j], j))
            on = sorted(on + off[:self.min_active - len(on)])
        return tuple(on)
