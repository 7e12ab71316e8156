"""benchmarks/gpu_check.py runs anywhere with --smoke: CPU here, the CUDA-only parts noted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import seqpar

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path),
                           "--only", "strategies", "fpdt_offload", "tflops"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(results["sections"]) == {"strategies", "fpdt_offload", "tflops"}
    rows = results["sections"]["strategies"]["result"]
    assert {r["strategy"] for r in rows} == set(seqpar.STRATEGIES)
    for r in rows:
        bound = 1e-5 if r["dtype"] == "float32" else 5e-2
        assert all(r[k] <= bound for k in ("out", "lse", "dq", "dk", "dv")), r
    offload = results["sections"]["fpdt_offload"]
    assert offload["result"]["host_peak_mib"] > 0 and "pinned memory" in offload["note"]
    assert [r["impl"].split(" (")[0] for r in results["sections"]["tflops"]["result"]] == ["seqpar block kernel",
                                                                                            "torch SDPA"]
    assert "## strategies" in (tmp_path / "gpu_check.md").read_text()
