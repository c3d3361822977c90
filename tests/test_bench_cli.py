"""The benchmark CLI writes one CSV row per measured point as soon as it is measured (a run that
is killed keeps its points), leaves excluded providers out, and prints the static model's
predicted time next to the measured one for the points the model covers."""

import csv
import io

from fastdistill.bench import __main__ as bench


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_rows_are_flushed_point_by_point_with_predictions(tmp_path, monkeypatch, capsys):
    model = tmp_path / "roofline.csv"
    model.write_text(
        "# model\nkernel,backend,divergence,dtype,N,V,D,instr_per_elem,mufu_per_elem,hbm_bytes,"
        "predicted_ms,floor_ms,ratio\n"
        "distill_kernel,triton,jsd,bf16,8192,128256,,100,4,1,4.0,1.5,2.6\n")
    out = tmp_path / "out"
    seen = []

    def fake_point(spec):
        # every earlier point is already in the file when the next one starts
        seen.append(len(_rows(out / "results.csv")))
        if spec["provider"] == "torch-compile":
            raise AssertionError("torch-compile was excluded")
        return {"time_s": 0.005 if spec["provider"] == "fastdistill-triton" else 0.02,
                "peak_extra_bytes": 0, "bytes_moved": 1, "flops": 0.0}

    monkeypatch.setattr(bench, "run_point", fake_point)
    monkeypatch.setattr(bench.measure, "copy_bandwidth", lambda device: 1e12)
    rc = bench.main(["--op", "distill", "--device", "cpu", "--dtype", "bf16", "--N", "4096",
                     "--V", "128256", "--divergence", "jsd", "--providers",
                     "fastdistill-triton", "torch-eager", "torch-compile", "--exclude",
                     "torch-compile", "--out", str(out), "--no-plot", "--predicted",
                     str(model)])
    assert rc == 0
    assert seen == [0, 1]
    rows = _rows(out / "results.csv")
    assert [r["provider"] for r in rows] == ["fastdistill-triton", "torch-eager"]
    r = rows[0]
    assert (r["op"], r["divergence"], r["dtype"], r["N"], r["V"]) == \
        ("distill", "jsd", "bf16", "4096", "128256")
    # the model's 4.0 ms at N = 8192 scales to 2.0 ms at N = 4096; measured 5 ms
    assert float(r["predicted_ms"]) == 2.0
    assert float(r["measured_over_predicted"]) == 2.5
    assert rows[1]["predicted_ms"] == ""
    assert "(predicted 2.00 ms)" in capsys.readouterr().out


def test_csv_row_fields():
    buf = io.StringIO()
    w = bench.start_csv(buf, {"commit": "x"}, dict(op="feature", dtype="bf16"), 1e12)
    w.writerow(bench.csv_row({"provider": "p", "N": 1, "V": 0, "time_s": 1.0},
                             dict(op="feature", divergence="forward_kl", dtype="bf16", D=64,
                                  hard_weight=0.0)))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("# ") and lines[1].split(",") == bench.CSV_KEYS
    assert lines[2].startswith("feature,p,mse,bf16,1,0,64,")


def test_linear_rows_show_their_ratio_to_the_gemm_floor(tmp_path, monkeypatch, capsys):
    """The gemm-floor provider runs first at each size; every linear row (CSV and table) then
    carries time / floor time."""
    out = tmp_path / "out"
    times = {"gemm-floor": 0.010, "fastdistill-chunked": 0.0115, "torch-eager": 0.04}
    monkeypatch.setattr(bench, "run_point",
                        lambda spec: {"time_s": times[spec["provider"]], "peak_extra_bytes": 0,
                                      "bytes_moved": 0, "flops": 1e9})
    monkeypatch.setattr(bench.measure, "copy_bandwidth", lambda device: 1e12)
    rc = bench.main(["--op", "linear", "--device", "cpu", "--N", "64", "--V", "512", "--D",
                     "32", "--providers", "gemm-floor", "fastdistill-chunked", "torch-eager",
                     "--out", str(out), "--no-plot"])
    assert rc == 0
    rows = {r["provider"]: r for r in _rows(out / "results.csv")}
    assert float(rows["gemm-floor"]["vs_gemm_floor"]) == 1.0
    assert abs(float(rows["fastdistill-chunked"]["vs_gemm_floor"]) - 1.15) < 1e-9
    text = capsys.readouterr().out
    assert "vs GEMM floor" in text and "1.150x" in text and "4.000x" in text


def test_gemm_floor_provider_runs_the_four_gemms():
    from fastdistill.bench import cases
    assert cases.linear_providers("cpu")[0] == "gemm-floor"
    run, reset, grad_bytes, moved, flops = cases.build(dict(
        op="linear", provider="gemm-floor", N=16, V=64, D=8, Dt=12, dtype="fp32",
        device="cpu"))
    run()
    reset()
    assert flops == 2.0 * 16 * 64 * (3 * 8 + 12) and grad_bytes == (16 * 8 + 64 * 8) * 4


def test_interleaved_runs_keep_each_providers_best_time(tmp_path, monkeypatch):
    """--interleave: every provider built in this process, run in turn, best time kept."""
    from fastdistill.bench import cases
    calls = []

    def fake_build(spec):
        def run():
            calls.append(spec["provider"])
        return run, lambda: None, 0, 1, 2.0

    monkeypatch.setattr(cases, "build", fake_build)
    monkeypatch.setattr(bench.measure, "copy_bandwidth", lambda device: 1e12)
    monkeypatch.setattr(bench, "run_point", lambda spec: (_ for _ in ()).throw(AssertionError))
    out = tmp_path / "out"
    rc = bench.main(["--op", "linear", "--device", "cpu", "--N", "8", "--V", "16", "--D", "4",
                     "--providers", "gemm-floor", "fastdistill-chunked", "--interleave", "3",
                     "--clock", "cpu", "--out", str(out), "--no-plot"])
    assert rc == 0
    # one warm-up each, then three rounds in turn
    assert calls == ["gemm-floor", "fastdistill-chunked"] * 4
    rows = _rows(out / "results.csv")
    assert [r["provider"] for r in rows] == ["gemm-floor", "fastdistill-chunked"]
    assert all(float(r["time_s"]) >= 0 and r["vs_gemm_floor"] for r in rows)
