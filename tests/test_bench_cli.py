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
