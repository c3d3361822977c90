"""LayerMap (which student layer learns from which teacher layer) and the layer-pair schedules
(ProgressiveLayerDrop, StochasticLayerDrop): pairs, formulas, state and errors."""

import random

import numpy as np
import pytest

import fastdistill as fd
from fastdistill.layers import uniform_draw


# ---- LayerMap ----------------------------------------------------------------------------------

@pytest.mark.parametrize("Ls,Lt,teacher", [
    (4, 12, [2, 5, 8, 11]),
    (4, 6, [1, 2, 4, 5]),          # ties 1.5 and 4.5 round up (Python's round: 1, 2, 3, 5)
    (2, 7, [3, 6]),                # tie 3.5 rounds up
    (3, 8, [2, 4, 7]),
    (6, 32, [4, 10, 15, 20, 26, 31]),
    (5, 5, [0, 1, 2, 3, 4]),
    (1, 12, [11]),
])
def test_layer_map_uniform(Ls, Lt, teacher):
    lm = fd.LayerMap.uniform(Ls, Lt)
    assert lm.pairs == tuple(zip(range(Ls), teacher))
    assert (lm.num_student_layers, lm.num_teacher_layers) == (Ls, Lt)
    assert lm.student_layers == tuple(range(Ls)) and lm.teacher_layers == tuple(teacher)


def test_layer_map_last_and_explicit():
    assert fd.LayerMap.last(2, 4, 12).pairs == ((2, 10), (3, 11))
    assert fd.LayerMap.last(3, 3, 3).pairs == ((0, 0), (1, 1), (2, 2))
    lm = fd.LayerMap.explicit([(0, 5), [1, 5], (1, 0)], 2, 6)
    assert lm.pairs == ((0, 5), (1, 5), (1, 0)) and len(lm) == 3 and lm[1] == (1, 5)
    assert lm == fd.LayerMap([(0, 5), (1, 5), (1, 0)], 2, 6) and lm != fd.LayerMap.last(1, 2, 6)


def test_layer_map_errors():
    with pytest.raises(ValueError, match=r"student layer 4 is out of range \[0, 4\)"):
        fd.LayerMap.explicit([(4, 0)], 4, 12)
    with pytest.raises(ValueError, match=r"teacher layer -1 is out of range \[0, 12\)"):
        fd.LayerMap.explicit([(0, -1)], 4, 12)
    with pytest.raises(ValueError, match=r"pairs\[2\] = \(1, 3\) repeats pairs\[0\]"):
        fd.LayerMap.explicit([(1, 3), (2, 3), (1, 3)], 4, 12)
    with pytest.raises(ValueError, match="at least one"):
        fd.LayerMap.explicit([], 4, 12)
    with pytest.raises(ValueError, match=r"pairs\[0\] must be a \(student_layer, teacher_layer"):
        fd.LayerMap.explicit([(1, 2, 3)], 4, 12)
    with pytest.raises(TypeError, match="teacher layer must be an int"):
        fd.LayerMap.explicit([(1, 2.0)], 4, 12)
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(num_student_layers, "
                                         r"num_teacher_layers\)\] = \[1, 4\], got 5"):
        fd.LayerMap.last(5, 4, 12)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fd.LayerMap.last(0, 4, 12)
    with pytest.raises(ValueError, match="num_student_layers <= num_teacher_layers"):
        fd.LayerMap.uniform(6, 4)
    with pytest.raises(ValueError, match="num_teacher_layers must be >= 1"):
        fd.LayerMap.uniform(1, 0)
    with pytest.raises(TypeError, match="num_student_layers must be an int"):
        fd.LayerMap.uniform(2.0, 4)


# ---- schedules ---------------------------------------------------------------------------------

def actives(sched, steps):
    return {s: sched.active(s) for s in steps}


def test_progressive_linear_exact_pairs():
    sched = fd.ProgressiveLayerDrop(4, keep=1, total_steps=300, start_step=50)
    assert actives(sched, [0, 50, 149, 150, 249, 250, 349, 350, 10 ** 6]) == {
        0: (0, 1, 2, 3), 50: (0, 1, 2, 3), 149: (0, 1, 2, 3), 150: (1, 2, 3), 249: (1, 2, 3),
        250: (2, 3), 349: (2, 3), 350: (3,), 10 ** 6: (3,)}


def test_progressive_stages_and_order():
    once = fd.ProgressiveLayerDrop(4, keep=1, total_steps=300, stages=1)
    assert actives(once, [299, 300]) == {299: (0, 1, 2, 3), 300: (3,)}
    two = fd.ProgressiveLayerDrop(4, keep=1, total_steps=300, stages=2)  # 3 pairs in 2 stages
    assert actives(two, [149, 150, 299, 300]) == {149: (0, 1, 2, 3), 150: (1, 2, 3),
                                                  299: (1, 2, 3), 300: (3,)}
    custom = fd.ProgressiveLayerDrop(fd.LayerMap.uniform(4, 8), keep=[0, 3], total_steps=100,
                                     drop_order=[2, 1])
    assert actives(custom, [49, 50, 100]) == {49: (0, 1, 2, 3), 50: (0, 1, 3), 100: (0, 3)}
    assert fd.ProgressiveLayerDrop(3, keep=3, total_steps=10).active(99) == (0, 1, 2)


def test_progressive_counter_and_state_dict():
    a = fd.ProgressiveLayerDrop(5, keep=2, total_steps=30, drop_order=[1, 0, 2])
    assert a.active() == (0, 1, 2, 3, 4)
    a.step()
    a.step(19)
    assert a.current_step == 20 and a.active() == (2, 3, 4)
    b = fd.ProgressiveLayerDrop(5, keep=4, total_steps=7)
    b.load_state_dict(a.state_dict())
    assert b.current_step == 20 and b.drop_order == (1, 0, 2) and b.keep == (3, 4)
    assert actives(b, range(40)) == actives(a, range(40))
    with pytest.raises(ValueError, match="state is from a ProgressiveLayerDrop, not a "
                                         "StochasticLayerDrop"):
        fd.StochasticLayerDrop(5, 0.5, 10).load_state_dict(a.state_dict())


def test_progressive_errors():
    with pytest.raises(ValueError, match=r"keep must be in \[1, num_pairs=4\]"):
        fd.ProgressiveLayerDrop(4, keep=0, total_steps=10)
    with pytest.raises(ValueError, match=r"keep entry 4 is out of range \[0, 4\)"):
        fd.ProgressiveLayerDrop(4, keep=[4], total_steps=10)
    with pytest.raises(ValueError, match="drop_order must list exactly the pairs not in keep"):
        fd.ProgressiveLayerDrop(4, keep=[3], total_steps=10, drop_order=[0, 1])
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        fd.ProgressiveLayerDrop(4, keep=1, total_steps=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        fd.ProgressiveLayerDrop(4, keep=1, total_steps=10).active(-1)


def splitmix64_np(x):
    """SplitMix64 with numpy uint64 wrap-around arithmetic (an independent implementation)."""
    with np.errstate(over="ignore"):
        x = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def test_stochastic_draws_follow_the_documented_formula():
    for seed, step, j in [(0, 0, 0), (7, 123456, 3), (2 ** 40 + 5, 9, 11)]:
        h = splitmix64_np(splitmix64_np(splitmix64_np(seed) ^ np.uint64(step)) ^ np.uint64(j))
        assert uniform_draw(seed, step, j) == float(h >> np.uint64(11)) / 2.0 ** 53
    sched = fd.StochasticLayerDrop(6, 0.25, total_steps=100, seed=11)
    for step in (0, 30, 100, 5000):
        p = 1 - 0.75 * min(step / 100, 1.0)
        want = tuple(j for j in range(6) if uniform_draw(11, step, j) < p) or None
        got = sched.active(step)
        if want is not None:
            assert got == want
        else:  # min_active=1: the pair whose draw came closest
            assert got == (min(range(6), key=lambda j: uniform_draw(11, step, j)),)


def test_stochastic_reproducible_and_history_free():
    steps = list(range(0, 400, 3))
    a = fd.StochasticLayerDrop(6, 0.4, total_steps=200, seed=5)
    b = fd.StochasticLayerDrop(6, 0.4, total_steps=200, seed=5)
    shuffled = steps[:]
    random.Random(0).shuffle(shuffled)
    ref = actives(a, steps)
    assert actives(b, shuffled) == ref and actives(a, steps) == ref
    other = fd.StochasticLayerDrop(6, 0.4, total_steps=200, seed=6)
    assert actives(other, steps) != ref
    assert ref[0] == tuple(range(6))  # keep probability 1 before the decay


def test_stochastic_keep_frequency_and_min_active():
    P = 8
    sched = fd.StochasticLayerDrop(P, 0.3, total_steps=100, seed=1)
    counts = [len(sched.active(s)) for s in range(100, 4100)]
    # P(no pair passes) = 0.7^8: then min_active adds one; E[active] = 0.3 P + 0.7^8
    assert abs(np.mean(counts) - (0.3 * P + 0.7 ** P)) < 0.1
    # halfway through the decay p = 1 - 0.7 / 2, over seeds
    half = [len(fd.StochasticLayerDrop(P, 0.3, 100, seed=s).active(50)) for s in range(500)]
    assert abs(np.mean(half) / P - 0.65) < 0.03
    two = fd.StochasticLayerDrop(P, 0.0, total_steps=10, seed=3, min_active=2)
    for s in range(10, 60):
        u = [uniform_draw(3, s, j) for j in range(P)]
        assert two.active(s) == tuple(sorted(sorted(range(P), key=lambda j: u[j])[:2]))
    per_pair = fd.StochasticLayerDrop(4, [0.0, 0.0, 1.0, 1.0], total_steps=10, seed=2)
    assert all(per_pair.active(s) == (2, 3) for s in range(10, 200))


def test_stochastic_state_dict_and_errors():
    a = fd.StochasticLayerDrop(4, [0.1, 0.2, 0.3, 0.4], total_steps=50, start_step=5, seed=9)
    a.step(17)
    b = fd.StochasticLayerDrop(4, 0.9, total_steps=10, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.current_step == 17 and b.seed == 9 and b.active() == a.active()
    assert actives(b, range(100)) == actives(a, range(100))
    with pytest.raises(ValueError, match=r"final_keep_prob must be in \[0, 1\]"):
        fd.StochasticLayerDrop(4, 1.5, 10)
    with pytest.raises(ValueError, match=r"final_keep_prob must have one entry per pair \(4\)"):
        fd.StochasticLayerDrop(4, [0.5, 0.5], 10)
    with pytest.raises(ValueError, match=r"min_active must be in \[1, num_pairs=4\]"):
        fd.StochasticLayerDrop(4, 0.5, 10, min_active=5)
    with pytest.raises(ValueError, match="state must have the keys"):
        b.load_state_dict({"type": "StochasticLayerDrop", "seed": 1})


def test_schedule_state_from_other_layer_pairs_is_refused():
    """A schedule saved for 3 pairs, loaded into one of 5 pairs: an error, not pairs that
    silently never train (the schedule and FeatureDistillLoss's state alike)."""
    three = fd.ProgressiveLayerDrop(3, keep=1, total_steps=10)
    five = fd.ProgressiveLayerDrop(5, keep=1, total_steps=10)
    with pytest.raises(ValueError, match="state is for 3 layer pairs, this schedule has 5"):
        five.load_state_dict(three.state_dict())
    a = fd.FeatureDistillLoss(fd.LayerMap.uniform(3, 6), 8, 8,
                              schedule=fd.ProgressiveLayerDrop(3, keep=1, total_steps=10))
    b = fd.FeatureDistillLoss(fd.LayerMap.last(3, 3, 6), 8, 8,
                              schedule=fd.ProgressiveLayerDrop(3, keep=1, total_steps=10))
    with pytest.raises(ValueError, match="the state_dict is for the layer pairs"):
        b.load_state_dict(a.state_dict())
