"""bench/gpu.py, the one command a session with a GPU runs: on the CPU (--quick, test shapes) every
item runs in its own process and leaves its row in the results file, and an item it has no time
left for leaves a row saying so. The figures themselves are measured on a card, not tested."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_gpu(results, *args):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--quick", f"--results={results}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {cells[2].strip(): cells[5].strip() for cells in (line.split("|") for line in results.read_text().splitlines()
                                                             if line.startswith("| 20"))}, done.stdout


def test_every_item_leaves_its_figures_in_the_results(tmp_path):
    # throughput's items are bench/train_throughput.py's own, tested in tests/test_bench.py; fsdp's
    # torchrun of the b200 preset is tests/test_presets.py's, and reads its figures as preset_3090
    rows, out = bench_gpu(tmp_path / "R.md", "--only=tests,preset_3090,memory")
    assert "skipped=" in rows["gpu_tests"] and "failed_tests=none" in rows["gpu_tests"]  # on a CPU the gpu tests skip
    for name, figures in (("gpu_preset_3090", "tok_s="), ("gpu_memory", "fake_gib=")):
        assert figures in rows[name] and "status" not in rows[name], (name, rows[name])
    assert "bench-gpu:" in out


def test_an_item_left_without_time_leaves_a_row_saying_so(tmp_path):
    rows, _ = bench_gpu(tmp_path / "R.md", "--only=throughput", "--budget_s=0")
    assert rows == {"gpu_throughput": "status=skipped: 0 s budget spent"}
