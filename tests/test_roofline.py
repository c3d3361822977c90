"""The static performance model (fastdistill.bench.roofline) on the sm_90 code of every kernel:
instruction and spill budgets that fail when a kernel regresses, counts spot-checked by an
independent reading of the SASS, the model's arithmetic, its CSV, --show-loop and --calibrate.

Uses the session's compile (conftest.py: aot_records) and the CUDA kernels of the built
extension (when it was built with nvcc)."""

import csv
import math
import re
import subprocess

import pytest

pytest.importorskip("triton", reason="triton not installed")

from fastdistill.bench import aot, roofline as R, sass as S  # noqa: E402
from fastdistill.backends import _ext  # noqa: E402

HAS_CUDA_EXT = _ext._C is not None and getattr(_ext._C, "has_cuda", False)

# Instructions per element, summed over a kernel's streaming passes (the loop-free path of the
# Triton row kernel), on the steady-state path of the sm_90 SASS (bench settings: labels, no hard
# loss, T = 1). Each budget is today's count
# plus about 8%: a change of the kernel or of the compiler that adds work per element fails
# here; one that removes work should lower the budget. (backend, kernel, divergence, dtype,
# tag) -> (budget, what it is).
BUDGETS = {
    # logit level, Triton on sm_90: the row kernel (loop-free: the row in registers over a
    # cluster of 16 CTAs, 32 columns of each input per thread (16 for the mixtures and the
    # symmetric KL), reductions of several operands once per row, ex2 / lg2.approx)
    ("triton", "distill_row_kernel", "forward_kl", "bf16", ""): (36, "33.19"),
    ("triton", "distill_row_kernel", "reverse_kl", "bf16", ""): (41, "37.09"),
    ("triton", "distill_row_kernel", "symmetric_kl", "bf16", ""): (65, "59.31"),
    ("triton", "distill_row_kernel", "jsd", "bf16", ""): (75, "68.81"),
    ("triton", "distill_row_kernel", "skew_forward_kl", "bf16", ""): (71, "65.06"),
    ("triton", "distill_row_kernel", "skew_reverse_kl", "bf16", ""): (72, "66.12"),
    ("triton", "distill_row_kernel", "tvd", "bf16", ""): (47, "43.09"),
    ("triton", "distill_row_kernel", "forward_kl", "fp32", ""): (47, "42.94: 16 columns each"),
    ("triton", "distill_row_kernel", "reverse_kl", "fp32", ""): (51, "46.5"),
    ("triton", "distill_row_kernel", "symmetric_kl", "fp32", ""): (59, "54.31"),
    ("triton", "distill_row_kernel", "jsd", "fp32", ""): (70, "64.44"),
    ("triton", "distill_row_kernel", "skew_forward_kl", "fp32", ""): (65, "60.0"),
    ("triton", "distill_row_kernel", "skew_reverse_kl", "fp32", ""): (66, "61.0"),
    ("triton", "distill_row_kernel", "tvd", "fp32", ""): (57, "52.69"),
    # logit level, CUDA: the resident kernel (the row in shared memory: the statistics pass,
    # which also keeps the copies into shared memory in flight; pass 2 of the mixtures; the
    # gradient), log2 domain with one fused multiply-add and one MUFU.EX2 per exponential
    ("cuda", "distill_kernel", "forward_kl", "bf16", ""): (31, "28.62 = 17.5 + 11.12"),
    ("cuda", "distill_kernel", "reverse_kl", "bf16", ""): (35, "31.62"),
    ("cuda", "distill_kernel", "symmetric_kl", "bf16", ""): (39, "36.0"),
    ("cuda", "distill_kernel", "jsd", "bf16", ""): (55, "50.38 = 14.88 + 24.12 + 11.38"),
    ("cuda", "distill_kernel", "skew_forward_kl", "bf16", ""): (55, "50.12"),
    ("cuda", "distill_kernel", "skew_reverse_kl", "bf16", ""): (55, "50.12"),
    ("cuda", "distill_kernel", "tvd", "bf16", ""): (47, "43.12"),
    ("cuda", "distill_kernel", "forward_kl", "fp32", ""): (35, "32.0"),
    ("cuda", "distill_kernel", "reverse_kl", "fp32", ""): (39, "35.25"),
    ("cuda", "distill_kernel", "symmetric_kl", "fp32", ""): (43, "39.25"),
    ("cuda", "distill_kernel", "jsd", "fp32", ""): (58, "53.5"),
    ("cuda", "distill_kernel", "skew_forward_kl", "fp32", ""): (58, "53.0"),
    ("cuda", "distill_kernel", "skew_reverse_kl", "fp32", ""): (58, "53.0"),
    ("cuda", "distill_kernel", "tvd", "fp32", ""): (49, "45.25"),
    # ... and the CUDA stream kernel (fallback: rows too wide, mixed dtypes, sm_80): 2 or 3
    # passes from global memory
    ("cuda", "distill_kernel", "forward_kl", "bf16", "stream"): (54, "49.62"),
    ("cuda", "distill_kernel", "reverse_kl", "bf16", "stream"): (57, "52.75"),
    ("cuda", "distill_kernel", "symmetric_kl", "bf16", "stream"): (63, "57.62"),
    ("cuda", "distill_kernel", "jsd", "bf16", "stream"): (97, "89.62"),
    ("cuda", "distill_kernel", "skew_forward_kl", "bf16", "stream"): (98, "90.5"),
    ("cuda", "distill_kernel", "skew_reverse_kl", "bf16", "stream"): (100, "92.38"),
    ("cuda", "distill_kernel", "tvd", "bf16", "stream"): (83, "76.5"),
    ("cuda", "distill_kernel", "forward_kl", "fp32", "stream"): (63, "57.5"),
    ("cuda", "distill_kernel", "reverse_kl", "fp32", "stream"): (66, "60.75"),
    ("cuda", "distill_kernel", "symmetric_kl", "fp32", "stream"): (70, "64.5"),
    ("cuda", "distill_kernel", "jsd", "fp32", "stream"): (114, "104.75"),
    ("cuda", "distill_kernel", "skew_forward_kl", "fp32", "stream"): (114, "105.0"),
    ("cuda", "distill_kernel", "skew_reverse_kl", "fp32", "stream"): (116, "107.0"),
    ("cuda", "distill_kernel", "tvd", "fp32", "stream"): (98, "90.25"),
    # features, one 4096-wide row in registers per program (loop-free)
    ("triton", "feature_kernel", "mse", "bf16", ""): (20, "18.25"),
    ("triton", "feature_kernel", "cosine", "bf16", ""): (27, "24.6"),
    ("triton", "feature_kernel", "normalized_mse", "bf16", ""): (43, "39.1"),
    ("triton", "feature_kernel", "mse", "fp32", ""): (18, "16.1"),
    ("triton", "feature_kernel", "cosine", "fp32", ""): (25, "22.5"),
    ("triton", "feature_kernel", "normalized_mse", "fp32", ""): (40, "36.6"),
    ("cuda", "feature_kernel", "mse", "bf16", ""): (26, "23.5 (the kind is a run-time value: "
                                                        "the cheapest, mse)"),
    ("cuda", "feature_kernel", "mse", "fp32", ""): (26, "23.7"),
    # backward's in-place scale (when grad_output != 1)
    ("triton", "scale_rows_kernel", "-", "bf16", ""): (6, "5.1"),
    ("triton", "scale_rows_kernel", "-", "fp32", ""): (5, "3.9"),
    ("cuda", "scale_rows_kernel", "-", "bf16", ""): (11.5, "10.1"),
    ("cuda", "scale_rows_kernel", "-", "fp32", ""): (17, "15.5"),
    # fused linear, the epilogue per logit of a 64 x 64 (stats) / 64 x 128 (grad) tile; the
    # K-loops (per 64-wide K step) are held separately below. The tile-order arithmetic of the
    # 1-D grids (splits of a row block adjacent; row groups) adds 1-4 per logit.
    ("triton", "linear_stats_kernel", "forward_kl", "bf16", ""): (60, "55.0"),
    ("triton", "linear_stats_kernel", "reverse_kl", "bf16", ""): (60, "55.38"),
    ("triton", "linear_stats_kernel", "jsd", "bf16", "PASS=1"): (48, "44.56"),
    ("triton", "linear_stats_kernel", "jsd", "bf16", "PASS=2"): (80, "73.44: with the NaN-row and mixture-underflow rules"),
    ("triton", "linear_stats_kernel", "tvd", "bf16", "PASS=1"): (48, "44.56"),
    ("triton", "linear_stats_kernel", "tvd", "bf16", "PASS=2"): (42, "38.69"),
    ("triton", "linear_grad_kernel", "forward_kl", "bf16", ""): (45, "41.09: with the NaN-row and mixture-underflow rules"),
    ("triton", "linear_grad_kernel", "reverse_kl", "bf16", ""): (44, "40.0: with the NaN-row and mixture-underflow rules"),
    ("triton", "linear_grad_kernel", "jsd", "bf16", ""): (88, "80.78: with the NaN-row and mixture-underflow rules"),
    ("triton", "linear_grad_kernel", "tvd", "bf16", ""): (50, "46.03: with the NaN-row and mixture-underflow rules"),
    # the GEMM with the accumulating epilogue (64 x 128 tile, 128 threads): epilogue per
    # element of C; fused: grad_hidden, chunked: grad_weight (the same kernel, other strides)
    ("triton", "mm_kernel", "forward_kl", "bf16", "EPI=2"): (9, "7.97: split planes written"),
    ("triton", "mm_kernel", "forward_kl", "bf16", "EPI=3"): (14.5, "13.06: planes read, added, written"),
    ("triton", "mm_kernel", "forward_kl", "bf16", "EPI=4"): (20.5, "18.8: planes read, rounded to bf16"),
    ("triton", "mm_kernel", "forward_kl", "bf16", "chunked,EPI=2"): (9, "7.8"),
    ("triton", "mm_kernel", "forward_kl", "bf16", "chunked,EPI=3"): (14.5, "12.89"),
    ("triton", "mm_kernel", "forward_kl", "bf16", "chunked,EPI=4"): (20.5, "18.62"),
    # mode="chunked": the logit-level kernel over float32 logits, writing the bf16 gradient
    # (the row kernel of fastdistill/kernels/distill.py at the chunked path's dtypes; labelled
    # with the weight dtype)
    ("triton", "distill_row_kernel", "forward_kl", "bf16", "chunked"): (48, "44.5"),
    ("triton", "distill_row_kernel", "reverse_kl", "bf16", "chunked"): (52, "48.0"),
    ("triton", "distill_row_kernel", "jsd", "bf16", "chunked"): (72, "66.12"),
    ("triton", "distill_row_kernel", "tvd", "bf16", "chunked"): (59, "54.25"),
    ("triton", "distill_row_kernel", "symmetric_kl", "bf16", "chunked"): (61, "55.88"),
    # symmetric KL: both one-pass numerators, two passes
    ("triton", "linear_grad_kernel", "symmetric_kl", "bf16", ""): (52, "48.09: forward and reverse numerators in one pass"),
    ("triton", "linear_stats_kernel", "symmetric_kl", "bf16", ""): (68, "63.25: forward and reverse numerators in one pass"),
    # sparse (top-k) teachers, K = 64: the passes over the student only (bucket / none: the
    # LSE outside the indices with a bitmask word per 32 columns, then the gradient); the O(K)
    # loops over the indices and the persistent row loop are not per element
    ("triton", "topk_distill_kernel", "forward_kl:bucket", "bf16", ""): (47, "24.5 + 18.6"),
    ("triton", "topk_distill_kernel", "forward_kl:bucket", "fp32", ""): (45, "25.1 + 15.8"),
    ("triton", "topk_distill_kernel", "jsd:none", "bf16", ""): (47, "24.5 + 18.5"),
    ("cuda", "topk_kernel", "-", "bf16", ""): (48, "24.5 + 19.1"),
    ("cuda", "topk_kernel", "-", "fp32", ""): (58, "30.8 + 22.3 (4 columns per 16-byte unit)"),
    # the extraction's steady path as the model picks it includes the merge of a tile into the
    # running top-K (two bitonic top-K over int64 keys); tiles that cannot enter skip it
    ("triton", "topk_extract_kernel", "-", "bf16", ""): (725, "670: merge path included"),
    ("triton", "topk_extract_kernel", "-", "fp32", ""): (765, "707: merge path included"),
}
# The Triton streaming kernel (the logit-level fallback: sm_80, rows wider than the row kernel
# holds) on sm_80 with the heavier settings (hard loss, T = 2): two passes (forward / reverse /
# symmetric KL) or three.
STREAM_BUDGETS_SM80 = {
    ("forward_kl", "bf16"): (118, "108.62"), ("forward_kl", "fp32"): (116, "106.88"),
    ("reverse_kl", "bf16"): (117, "107.5"), ("reverse_kl", "fp32"): (115, "105.88"),
    ("symmetric_kl", "bf16"): (135, "124.75"), ("symmetric_kl", "fp32"): (133, "122.88"),
    ("jsd", "bf16"): (217, "200.25"), ("jsd", "fp32"): (215, "198.75"),
    ("skew_forward_kl", "bf16"): (196, "180.88"), ("skew_forward_kl", "fp32"): (195, "179.75"),
    ("skew_reverse_kl", "bf16"): (234, "216.0"), ("skew_reverse_kl", "fp32"): (232, "214.75"),
    ("tvd", "bf16"): (145, "133.62"), ("tvd", "fp32"): (144, "132.5"),
}
# instructions per K step (BLOCK_K = 64: four HGMMA.64xNx16) of the fused linear kernels' GEMM
# loops on sm_90; today 79-81 (stats), 91-97 (grad), 118-122 (mm_kernel: cp.async of a 64 x 64
# and a 64 x 128 tile by 128 threads, masked rows)
K_LOOP_BUDGET = {"linear_stats_kernel": 88, "linear_grad_kernel": 105, "mm_kernel": 131}


@pytest.fixture(scope="module")
def analyses(aot_records):
    """sm_90 analyses of every Triton kernel and (when built) every CUDA kernel."""
    return R.analyses_for(90, records=[r for r in aot_records if r["arch"] == 90],
                          cuda=HAS_CUDA_EXT)


def _key(a):
    tag = re.search(r",((?:PASS|EPI)=\d)\]$", a.name)
    tag = tag.group(1) if tag else ""
    if a.variant == "chunked":
        tag = "chunked" + ("," + tag if tag else "")
    elif a.variant == "stream":
        tag = "stream"
    return (a.backend, a.kernel, a.divergence, a.dtype, tag)


def _bench90(analyses):
    return [a for a in analyses
            if a.arch == 90 and a.variant in ("bench", "onetile", "stream", "chunked")
            and a.dtype in ("bf16", "fp32") and a.per_elem]


def test_instruction_budgets(analyses):
    got = {_key(a): a for a in _bench90(analyses)}
    expected = {k for k in BUDGETS if k[0] == "triton" or HAS_CUDA_EXT}
    missing = expected - set(got)
    assert not missing, f"kernels without a budget-checked analysis: {sorted(missing)}"
    over = [(k, round(got[k].instr_per_elem, 2), BUDGETS[k][0]) for k in expected
            if got[k].instr_per_elem > BUDGETS[k][0]]
    assert not over, ("instructions per element above budget (kernel, now, budget); if the "
                      f"extra work is intended, raise the budget with a reason: {over}")
    unbudgeted = [k for k in got if k not in BUDGETS]
    assert not unbudgeted, f"new kernels need a budget in tests/test_roofline.py: {unbudgeted}"


def test_k_loop_budgets(analyses):
    for a in _bench90(analyses):
        for lp in a.kloops:
            assert lp.instr <= K_LOOP_BUDGET[a.kernel], (a.name, lp.instr)
            assert sum(lp.mma.values()) == 4 and all(k.startswith("HGMMA.64x")
                                                     for k in lp.mma), (a.name, lp.mma)


def test_spill_budget_is_zero(aot_records):
    """No kernel, Triton or CUDA, sm_80 or sm_90, uses local memory or stack."""
    usage = [(r["name"], r["arch"], r["local"] + r["stack"]) for r in aot_records]
    if HAS_CUDA_EXT:
        usage += [(r["name"], r["arch"], r["local"] + r["stack"])
                  for r in aot.extension_kernels()]
    assert {arch for _, arch, _ in usage} == {80, 90}
    bad = [u for u in usage if u[2]]
    assert not bad, f"kernels with spills (local + stack bytes), budget 0: {bad}"


def test_elements_per_iteration_from_launch_and_from_loads_agree(analyses):
    """Triton streaming loops: the tile constexprs / threads and the bytes the loop's path
    loads / the bytes an element needs (student + teacher) give the same elements per thread;
    CUDA: the loads give one 16-byte unit of the student (8 columns of 16 bits, 4 of float32),
    the unit of csrc/cuda/common.cuh."""
    checked = 0
    for a in analyses:
        if a.op not in ("distill", "feature", "scale"):
            continue
        for lp in a.streams:
            checked += 1
            if a.backend == "triton":
                assert lp.elems == lp.elems_from_loads, (a.name, a.arch, lp.elems,
                                                         lp.elems_from_loads)
            else:
                assert lp.elems == 16 / R.ESIZE[a.dtype], (a.name, a.arch, lp.elems)
        if not a.streams and a.backend == "triton" and a.op != "linear":
            assert a.body_elems * R.stream_bytes_per_elem(a.op, a.dtype) * 8 <= \
                a.body.load_bits, a.name
    assert checked > 40


def test_passes_found_in_the_sass_match_the_construction(analyses):
    """The streaming distill kernels pass over the row 2 times (forward / reverse / symmetric
    KL) or 3 times (the others): the streaming loops found from the backward branches are
    those passes (the CUDA resident kernel's from shared memory, its first also keeping the
    copies into shared memory in flight). The Triton row kernel is loop-free: the row in
    registers, every column of this thread in its one path."""
    checked = set()
    for a in analyses:
        if a.op != "distill" or a.dtype not in ("bf16", "fp32"):
            continue
        if a.kernel == "distill_row_kernel":
            assert not a.streams and a.body_elems == a.rec["constexprs"]["NT"] * \
                a.rec["constexprs"]["TB"] / (a.rec["num_ctas"] * a.threads), a.name
        else:
            want = 2 if a.divergence in R.TWO_PASS else 3
            assert len(a.streams) == want, (a.name, a.arch, [(lp.start, lp.instr)
                                                              for lp in a.streams])
        checked.add((a.backend, a.kernel, a.variant))
    assert ("triton", "distill_row_kernel", "bench") in checked
    if HAS_CUDA_EXT:
        assert {("cuda", "distill_kernel", "bench"), ("cuda", "distill_kernel", "stream")} <= \
            checked


def test_triton_streaming_kernel_budgets_on_sm80(aot_records):
    """The Triton fallback (sm_80, and rows wider than the row kernel holds) keeps a budget too:
    its sm_80 code with the heavier settings."""
    got = {}
    for r in aot_records:
        if r["kernel"] == "distill_kernel" and r["arch"] == 80 and r["variant"] == "hard":
            a = R.analyse(r, R.A100)
            assert len(a.streams) == (2 if a.divergence in R.TWO_PASS else 3), a.name
            got[(a.divergence, a.dtype)] = a.instr_per_elem
    assert set(got) == set(STREAM_BUDGETS_SM80)
    over = [(k, round(v, 2), STREAM_BUDGETS_SM80[k][0]) for k, v in got.items()
            if v > STREAM_BUDGETS_SM80[k][0]]
    assert not over, f"instructions per element above budget: {over}"


def _independent_loops(sass_text):
    """Loops as [start, end] address ranges of backward branches, read with a regex alone."""
    loops = []
    for line in sass_text.splitlines():
        m = re.match(r"([0-9a-f]+): (?:@!?P\d+ )?BRA (?:\w+, )?0x([0-9a-f]+)$", line)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            loops.append((int(m.group(2), 16), int(m.group(1), 16)))
    return loops


def test_spot_check_triton_distill_counts_against_a_plain_reading(aot_records, analyses):
    """The Triton row kernel, forward KL at T = 1: its columns are NT TB / (CTAs x threads) per
    thread, and the path the model reads issues two MUFU.EX2 per column (the student and
    teacher exponentials, once each: q and p are e_s 2^-l_s and e_t 2^-l_t) and a few per row
    (2^-l_s, 2^-l_t); the whole function has at most twice that many more (the guarded path
    of a row with -inf logits recomputes them). A plain count of the listing's lines agrees."""
    rec = next(r for r in aot_records if r["name"] == "distill_row_kernel[forward_kl,bf16,bench]"
               and r["arch"] == 90)
    a = next(a for a in analyses if a.name == rec["name"] and a.arch == 90)
    c = rec["constexprs"]
    elems = c["NT"] * c["TB"] / (rec["num_ctas"] * 32 * rec["num_warps"])
    assert elems == a.body_elems == 32
    ex2_path = a.body.mufu.get("EX2", 0)
    assert 2 * elems <= ex2_path <= 2 * elems + 8, ex2_path
    plain = sum("MUFU.EX2" in line for line in rec["sass"].splitlines())
    assert ex2_path <= plain <= 2 * ex2_path + 8, (ex2_path, plain)
    assert not _independent_loops(rec["sass"]) or all(
        "MUFU" not in line for line in rec["sass"].splitlines()
        if any(lo <= int(line.split(":")[0], 16) <= hi for lo, hi in
               _independent_loops(rec["sass"])))


@pytest.mark.skipif(not HAS_CUDA_EXT, reason="fastdistill._C built without CUDA kernels")
def test_spot_check_cuda_distill_against_cuobjdump(analyses):
    """The CUDA forward-KL kernel (bf16, sm_90) read straight from the extension with
    cuobjdump -fun: the loops found by the plain reading are those of the analysis, and each
    of its two passes has 2 MUFU.EX2 per element on the path (exp of the student and teacher
    terms; q and p), 16 per 8-column unit."""
    a = next(a for a in analyses if a.backend == "cuda" and a.kernel == "distill_kernel"
             and a.divergence == "forward_kl" and a.dtype == "bf16" and a.arch == 90)
    out = subprocess.run([aot.nvidia_bin("cuobjdump"), "--dump-sass", "-fun",
                          a.rec["mangled"], "-arch", "sm_90", _ext._C.__file__],
                         capture_output=True, text=True, check=True).stdout
    compact = "\n".join(f"{m.group(1)}: {m.group(2)}" for m in
                        re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", out))
    plain = _independent_loops(compact)
    ours = {(lp.start, lp.end) for lp in a.loops}
    # every loop of the analysis closes with a backward branch of the plain reading
    for start, end in ours:
        assert any(lo == start and hi <= end for lo, hi in plain), (hex(start), hex(end))
    assert [lp.mufu.get("EX2", 0) for lp in a.streams] == [16, 16]
    assert [lp.elems for lp in a.streams] == [8, 8]


def test_model_arithmetic(analyses):
    rows = R.build_table([a for a in analyses if a.arch == 90], R.H200)
    m = R.H200
    r = next(r for r in rows if r["kernel"] == "distill_kernel" and r["backend"] == "triton"
             and r["divergence"] == "forward_kl" and r["dtype"] == "bf16" and r["V"] == 128256)
    N, V = 8192, 128256
    assert r["hbm_bytes"] == N * V * (2 + 2 + 2)  # s and t read once, g written once
    assert r["mem_ms"] == pytest.approx(N * V * 6 / m.hbm_bytes_s * 1e3, rel=1e-4)
    assert r["floor_ms"] == pytest.approx(N * V * 6 / m.hbm_bytes_s * 1e3, rel=1e-4)
    a = next(a for a in analyses if a.name == r["name"] and a.arch == 90)
    # the row kernel: N clusters of num_ctas CTAs, each thread its one loop-free path
    warp_instr = N * a.rec["num_ctas"] * a.rec["num_warps"] * a.body.instr
    assert r["issue_ms"] == pytest.approx(warp_instr / (132 * 4 * 1.83e9) * 1e3, rel=1e-4)
    assert r["predicted_ms"] == pytest.approx(max(r["mem_ms"], r["issue_ms"], r["mufu_ms"]),
                                              rel=1e-4)
    assert r["ratio"] == pytest.approx(r["predicted_ms"] / r["floor_ms"], rel=1e-3)
    # the fused linear op against its GEMM floor, 2 N V (3 Ds + Dt) at 790 TFLOP/s
    lin = next(r for r in rows if r["kernel"] == "linear_fused (fwd+bwd)"
               and r["divergence"] == "forward_kl")
    assert lin["floor_ms"] == pytest.approx(2 * N * V * 4 * 4096 / 790e12 * 1e3, rel=1e-4)
    assert "HGMMA.64x" in lin["mma"]
    # the rows the issue asks for: every logit-level divergence on both backends, the fused
    # linear kernels, the feature kernels
    from fastdistill.divergences import DIVERGENCE_CODES
    for backend in ("triton",) + (("cuda",) if HAS_CUDA_EXT else ()):
        divs = {r["divergence"] for r in rows if r["kernel"] == "distill_kernel"
                and r["backend"] == backend}
        assert divs == set(DIVERGENCE_CODES), (backend, divs)
        assert any(r["kernel"] == "feature_kernel" and r["backend"] == backend for r in rows)
    assert {"linear_stats_kernel", "linear_grad_kernel"} <= {r["kernel"].split("[")[0]
                                                            for r in rows}


def test_csv_columns_and_show_loop(analyses, tmp_path):
    rows = R.build_table([a for a in analyses if a.arch == 90], R.H200)
    path = tmp_path / "roofline.csv"
    R.write_csv(rows, str(path), "header")
    with open(path) as f:
        assert f.readline().startswith("# header")
        head = next(csv.reader(f))
    assert head[:13] == ["kernel", "backend", "divergence", "dtype", "N", "V", "D",
                         "instr_per_elem", "mufu_per_elem", "hbm_bytes", "predicted_ms",
                         "floor_ms", "ratio"]
    back = R.read_csv(str(path))
    assert len(back) == len(rows) and back[0]["kernel"] == rows[0]["kernel"]
    text = R.show_loop(analyses, "distill_row_kernel[forward_kl,bf16,bench]")
    marked = [x for x in text.splitlines() if x.startswith("* ")]
    a = next(a for a in analyses if a.name == "distill_row_kernel[forward_kl,bf16,bench]"
             and a.arch == 90)
    assert len(marked) >= a.body.instr  # the loop-free path listed (and the loops' paths)
    assert "MUFU.EX2" in text and "instr/elem" in text


def test_calibrate_from_a_results_csv(analyses, tmp_path):
    """A bench results CSV whose fastdistill points took 1.5x (triton) and 0.8x (cuda) the
    predicted time gives those factors."""
    rows = R.build_table([a for a in analyses if a.arch == 90], R.H200)
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        f.write("# env line\n")
        w = csv.DictWriter(f, fieldnames=["op", "provider", "divergence", "dtype", "N", "V",
                                          "D", "time_s", "peak_extra_bytes", "error"])
        w.writeheader()
        for V in (50257, 128256):
            for prov, backend, k in (("fastdistill-triton", "triton", 1.5),
                                     ("fastdistill-cuda", "cuda", 0.8)):
                if backend == "cuda" and not HAS_CUDA_EXT:
                    continue
                pred = next(r for r in rows if r["kernel"] == "distill_kernel"
                            and r["backend"] == backend and r["divergence"] == "jsd"
                            and r["dtype"] == "bf16" and r["V"] == V)["predicted_ms"]
                w.writerow(dict(op="distill", provider=prov, divergence="jsd", dtype="bf16",
                                N=8192, V=V, D="", time_s=k * pred / 1e3))
        w.writerow(dict(op="distill", provider="torch-eager", divergence="jsd", dtype="bf16",
                        N=8192, V=128256, time_s=1.0))
        w.writerow(dict(op="distill", provider="fastdistill-triton", divergence="jsd",
                        dtype="bf16", N=8192, V=128256, error="OOM"))
    text = R.calibrate(rows, [str(path)])
    summary = [x for x in text.splitlines() if x.startswith("| distill_kernel | triton | 2 |")]
    assert summary and "| 1.500 |" in summary[0], text
    if HAS_CUDA_EXT:
        assert "| distill_kernel | cuda | 2 | 0.800 |" in text, text


def test_specialise_by_hand_matches_the_jit_binder():
    """The fallback for Triton versions without the binder API gives the same signature,
    constexprs and divisibility hints as Triton's own on the captured launches (in a process
    without TRITON_INTERPRET)."""
    import os
    import sys
    code = (
        "from fastdistill.bench import aot\n"
        "specs = aot.collect(aot.workloads(ops=('distill', 'linear', 'scale'), "
        "variants=('bench',)))\n"
        "n = 0\n"
        "for s in specs:\n"
        "    _, sig, consts, attrs, opts = aot.specialise(s.launch, 90)\n"
        "    sig2, consts2, attrs2, _ = aot.specialise_by_hand(s.launch)\n"
        "    assert sig == sig2, (s.name, sig, sig2)\n"
        "    assert {k: v for k, v in consts.items()} == consts2, (s.name, consts, consts2)\n"
        "    assert {k for k, v in attrs.items() if v} == set(attrs2), (s.name, attrs, attrs2)\n"
        "    n += 1\n"
        "print('checked', n)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert int(p.stdout.split()[-1]) > 20


def test_sass_cfg_on_a_small_listing():
    """Blocks, a loop with a rare branch inside, the steady-state path: the fall-through with
    the vector load, not the scalar fallback nor the rare path."""
    text = "\n".join([
        "0000: MOV R1, R2",
        "0010: ISETP.GE.AND P0, PT, R1, R3, PT",
        "0020: @P0 EXIT",
        "0030: @P1 BRA 0x60",             # loop header: aligned?
        "0040: LDG.E.U16 R4, desc[UR4][R6.64]",
        "0050: BRA 0x70",
        "0060: LDG.E.128 R4, desc[UR4][R6.64]",
        "0070: FMNMX R8, R4, R5, !PT",
        "0080: @P2 BRA 0xb0",             # rare: a new maximum
        "0090: MUFU.EX2 R9, R8",
        "00a0: BRA 0xe0",
        "00b0: FMUL R9, R9, R8",
        "00c0: FMUL R9, R9, R8",
        "00d0: MUFU.EX2 R9, R8",
        "00e0: STG.E.128 desc[UR4][R6.64], R8",
        "00f0: @P3 BRA 0x30",
        "0100: EXIT",
        "0110: BRA 0x110",
    ])
    cfg = S.CFG(text)
    assert len(cfg.loops) == 1
    lp = cfg.loops[0]
    path = cfg.steady_path(lp)
    instrs = cfg.path_instrs(path)
    ops = [x.opcode for x in instrs]
    assert "LDG.E.128" in ops and "LDG.E.U16" not in ops and "FMUL" not in ops
    assert S.count(instrs).instr == 8 and S.count(instrs).mufu == {"EX2": 1}
    assert cfg.ins[-1].base == "EXIT"  # the closing 'BRA self' is padding


def test_linear_modes_against_the_gemm_floor(analyses):
    """The linear loss at the gpu-linear preset (N = 8192, V = 128256, D = 4096, bf16): the
    GEMM floor row, and per divergence the chunked and fused totals with their parts. Goals of
    the model: chunked within 1.2x the four GEMMs and 2 GB extra; fused within 256 MB extra
    (its time is held at today's prediction: its recompute is 1.5x the floor by construction,
    2x for the divergences with a second statistics sweep)."""
    rows = R.build_table([a for a in analyses if a.arch == 90], R.H200)
    floor = [r for r in rows if r["kernel"] == R.GEMM_FLOOR]
    assert {r["divergence"] for r in floor} == set(R.LINEAR_DIVERGENCES)
    N, V, D = 8192, 128256, 4096
    assert floor[0]["predicted_ms"] == pytest.approx(2 * N * V * 4 * D / 790e12 * 1e3, rel=1e-4)
    total = {(r["mode"], r["divergence"]): r for r in rows if r["kernel"].endswith("(fwd+bwd)")}
    assert {d for m, d in total if m == "chunked"} == set(R.LINEAR_DIVERGENCES)
    assert {d for m, d in total if m == "fused"} == set(R.LINEAR_DIVERGENCES)
    for (mode, div), r in total.items():
        if mode == "chunked":
            assert r["ratio"] <= 1.2, (div, r["ratio"])
            assert r["extra_bytes"] <= 2e9, (div, r["extra_bytes"])
        else:
            assert r["extra_bytes"] <= 256 << 20, (div, r["extra_bytes"])
            assert r["ratio"] <= (1.6 if div in R.TWO_PASS else 2.2), (div, r["ratio"])
    parts = [r["kernel"] for r in rows if r.get("mode") == "chunked"
             and r["divergence"] == "jsd"]
    assert any(k.startswith("mm_kernel: grad_weight") for k in parts), parts
    assert "distill_row_kernel" in parts, parts
    assert "cublas: grad_hidden" in parts
