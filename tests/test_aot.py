"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 on this GPU-less machine, as
its launcher specialises it at the benchmark shapes (fastdistill.bench.aot records the launches
on meta tensors), without register spills, with 128-bit global loads, and the fused linear
kernels on tensor cores. The compile is shared with tests/test_roofline.py (the session fixture
aot_records of conftest.py)."""

import pytest

pytest.importorskip("triton", reason="triton not installed")

KERNELS = {"distill_kernel", "distill_row_kernel", "feature_kernel", "scale_rows_kernel",
           "linear_stats_kernel", "linear_grad_kernel", "linear_finish_kernel", "mm_kernel",
           "topk_distill_kernel", "topk_extract_kernel"}
# the logit-level kernels: the row kernel (the row in registers over a thread-block cluster)
# needs sm_90, where the streaming kernel remains the fallback (rows too wide for the row
# kernel's registers at these settings)
LOGIT = ("distill_kernel", "distill_row_kernel")


def test_every_kernel_compiled_for_both_archs(aot_records):
    kernels = {r["kernel"] for r in aot_records}
    assert kernels == KERNELS, f"kernels launched by the workloads: {sorted(kernels)}"
    for k in kernels:
        archs = {r["arch"] for r in aot_records if r["kernel"] == k}
        want = {90} if k == "distill_row_kernel" else {80, 90}
        if k == "distill_kernel":
            assert 80 in archs, archs
        else:
            assert archs == want, f"{k} compiled for {sorted(archs)}, expected {sorted(want)}"
    # every divergence of the logit-level kernels, both dtypes, the heavier variant on both archs
    from fastdistill.divergences import DIVERGENCE_CODES
    for arch in (80, 90):
        got = {(r["divergence"], r["dtype"]) for r in aot_records
               if r["kernel"] in LOGIT and r["arch"] == arch and r["variant"] == "hard"}
        assert got == {(d, t) for d in DIVERGENCE_CODES for t in ("bf16", "fp32")}, (arch, got)
    assert all(r["kernel"] == "distill_kernel" for r in aot_records
               if r["kernel"] in LOGIT and r["arch"] == 80)


def test_specs_follow_the_launchers(aot_records, monkeypatch):
    """The compiled configurations are what the launchers pass: tiles, warps and clusters of
    fastdistill.kernels at the benchmark shapes (V = 128256, D = 4096, bf16), outside the
    interpreter (which this process runs, with small tiles)."""
    import torch

    from fastdistill.kernels import distill, linear
    monkeypatch.setattr(distill, "interpreting", lambda: False)
    monkeypatch.setattr(linear, "interpreting", lambda: False)
    d = [r for r in aot_records if r["kernel"] == "distill_kernel" and r["dtype"] == "bf16"]
    assert d and all(r["constexprs"]["BLOCK"] == distill.block_size(128256) for r in d)
    assert all(r["num_warps"] == distill.launch_options(2048)["num_warps"] for r in d)
    rows = [r for r in aot_records if r["kernel"] == "distill_row_kernel" and r["dtype"] == "bf16"]
    assert rows
    from fastdistill.divergences import DIVERGENCE_CODES
    for r in rows:
        esize = 4 if r["variant"] == "chunked" else 2  # mode="chunked" reads float32 logits
        elems = distill.row_elems(DIVERGENCE_CODES[r["divergence"]], esize, True,
                                  r["variant"] == "hard")
        nt, tb, ctas, warps = distill.row_plan(128256, esize, (9, 0), elems=elems)
        assert (r["constexprs"]["NT"], r["constexprs"]["TB"], r["num_ctas"], r["num_warps"]) \
            == (nt, tb, ctas, warps), r["name"]
    g = [r for r in aot_records if r["kernel"] == "linear_grad_kernel"]
    BM, BN, BK, warps = linear._tiles(torch.bfloat16, "grad")
    assert g and all((r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"],
                      r["constexprs"]["BLOCK_K"], r["num_warps"]) == (BM, BN, BK, warps)
                     for r in g)
    mm = [r for r in aot_records if r["kernel"] == "mm_kernel"]
    BM, BN, BK, warps, stages = linear._mm_tiles(torch.bfloat16)
    assert mm and all((r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"],
                       r["constexprs"]["BLOCK_K"], r["num_warps"], r["num_stages"]) ==
                      (BM, BN, BK, warps, stages) for r in mm)
    # mode="chunked": the logit-level kernel over float32 logits (the row kernel on sm_90, the
    # streaming kernel on sm_80), writing the 16-bit gradient
    chunked = [r for r in aot_records if r["variant"] == "chunked"]
    assert {r["kernel"] for r in chunked if r["arch"] == 90} == {"distill_row_kernel",
                                                                  "mm_kernel"}


def test_no_spills(aot_records):
    bad = [(r["name"], r["arch"], r["local"], r["stack"]) for r in aot_records
           if r["local"] != 0 or r["stack"] != 0]
    assert not bad, f"kernels using local memory (spills), expected none: {bad}"


STREAMING = ("distill_kernel", "distill_row_kernel", "feature_kernel", "scale_rows_kernel",
             "linear_stats_kernel", "linear_grad_kernel", "mm_kernel")


def test_vectorised_loads(aot_records):
    """The kernels that stream big tensors load 128 bits at a time (linear_finish reads a few
    floats per row and is exempt)."""
    scalar = [(r["name"], r["arch"]) for r in aot_records
              if r["kernel"] in STREAMING and not r["ldg128"]]
    assert not scalar, f"kernels without 128-bit global loads: {scalar}"


def test_fused_linear_uses_tensor_cores(aot_records):
    """bf16 fused linear kernels and the GEMM with the accumulating epilogue: HMMA on sm_80,
    warpgroup HGMMA on sm_90; the GEMM's K-loop loads through cp.async (pipelined)."""
    fused = [r for r in aot_records if r["kernel"] in ("linear_stats_kernel",
                                                        "linear_grad_kernel", "mm_kernel")]
    assert fused
    missing = [(r["name"], r["arch"]) for r in fused
               if not (r["hmma"] if r["arch"] == 80 else r["hgmma"])]
    assert not missing, f"fused linear kernels without HMMA (sm_80) / HGMMA (sm_90): {missing}"
    sync = [(r["name"], r["arch"]) for r in fused if r["kernel"] == "mm_kernel"
            and "LDGSTS" not in r["sass"]]
    assert not sync, f"mm_kernel without cp.async (its K-loop is not pipelined): {sync}"


def test_sparse_teacher_kernels_stream_128_bits(aot_records):
    """The top-k kernels read the student (or the logits) 128 bits at a time wherever they
    stream it: every variant but renormalize without a hard loss, which reads only the K
    logits of a row and writes its gradient without reading it."""
    recs = [r for r in aot_records if r["kernel"] in ("topk_distill_kernel", "topk_extract_kernel")]
    assert {r["arch"] for r in recs} == {80, 90}
    streaming = [r for r in recs if not (r["divergence"].endswith(":renormalize")
                                          and r["variant"] == "bench")]
    scalar = [(r["name"], r["arch"]) for r in streaming if not r["ldg128"]]
    assert streaming and not scalar, f"top-k kernels without 128-bit loads: {scalar}"
    assert all("STG.E.128" in r["sass"] for r in recs if r["kernel"] == "topk_distill_kernel")
