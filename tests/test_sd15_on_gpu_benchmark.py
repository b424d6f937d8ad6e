"""benchmarks/sd15_on_gpu.py, the GPU measurement of issue 5, scaled down on the CPU so that it
cannot rot while no GPU is at hand: it builds SD 1.5's architecture, trains one DDPO epoch and one
ReFL step through `model=sd15`, and writes its markdown report."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_scaled_down_and_writes_its_report(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sd15_on_gpu.py"), "--device", "cpu",
                           "--scaled-down", "--resolution", "64", "--steps", "2", "--samples", "4", "--batch", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "SD 1.5's UNet (2M parameters, scaled down)" in text and "LoRA rank 8" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(("| ddpo", "| refl"))]
    assert [row[0].split(":")[0].strip() for row in rows] == ["ddpo", "ddpo", "ddpo", "ddpo", "refl", "refl"]
    for phase, run, seconds, samples, per_second, peak in rows:
        assert float(seconds) > 0 and float(per_second) > 0 and float(peak) > 0, phase
        assert int(samples) == (4 if "ddpo" in phase else 2)  # DDPO's epoch; one ReFL minibatch


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_gpu_benchmark_refuses_cuda_without_a_gpu_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sd15_on_gpu.py")], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--device cuda: no CUDA device here" in proc.stderr
