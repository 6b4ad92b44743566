"""bench/gpu.py, the one command a session with a GPU runs: on the CPU (--quick, test shapes) every
item runs in its own process and leaves its row in the results file, and an item it has no time
left for leaves a row saying so. It imports only what a GPU machine's own python3 has: here the
packages such a machine lacks cannot be imported. The figures themselves are measured on a card."""

import os
import subprocess
import sys

from conftest import ROOT

# what the H200 machine's python3 lacks (it has torch, transformers, sentencepiece, safetensors,
# tokenizers, tqdm, numpy, matplotlib, pyarrow, protobuf, huggingface_hub and pytest)
ABSENT = ("wandb", "datasets", "gguf", "ftfy", "py3langid", "lm_eval", "llama_cpp")
# Python imports sitecustomize at start-up from PYTHONPATH: its finders answer "not installed" for
# ABSENT, in every process bench/gpu.py starts (find_spec returns None, as if no such package)
BLOCKER = f'''import sys
ABSENT = {ABSENT!r}

class Absent:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)

sys.meta_path[:] = [Absent(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
'''


def without_absent_packages(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), ROOT]))


def bench_gpu(tmp_path, *args):
    results = tmp_path / "R.md"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--quick", f"--results={results}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=without_absent_packages(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {cells[2].strip(): cells[5].strip() for cells in (line.split("|") for line in results.read_text().splitlines()
                                                             if line.startswith("| 20"))}, done.stdout


def test_the_blocker_makes_the_absent_packages_unimportable(tmp_path):
    probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(n) for n in %r))" % (ABSENT,)
    assert subprocess.run([sys.executable, "-c", probe], env=without_absent_packages(tmp_path)).returncode == 0
    assert subprocess.run([sys.executable, "-c", "import wandb"], env=without_absent_packages(tmp_path),
                          capture_output=True).returncode != 0


def test_every_item_leaves_its_figures_in_the_results_without_the_absent_packages(tmp_path):
    # throughput's items are bench/train_throughput.py's own, tested in tests/bench/test_bench.py; fsdp's
    # torchrun of the b200 preset is tests/test_presets.py's, and reads its figures as preset_3090
    out = tmp_path / "out"
    rows, stdout = bench_gpu(tmp_path, "--only=tests,fp8,preset_3090,memory,optimizers,guard", f"--out={out}")
    assert "skipped=" in rows["gpu_tests"] and "failed_tests=none" in rows["gpu_tests"]  # on a CPU the gpu tests skip
    for name, figures in (("gpu_preset_3090", "tok_s="), ("gpu_memory", "fake_gib="),
                          ("gpu_optimizers", "muon_over_adamw_at_64_micro_batches="), ("guard_cost", "guard_share="),
                          ("gpu_fp8", "relative_difference=")):
        assert figures in rows[name] and "status" not in rows[name], (name, rows[name])
    # the machine first, a line as each item ends, all of it in the log with the rows it added
    first = stdout.splitlines()[0]
    assert first.startswith("python ") and "torch " in first and "CUDA " in first
    assert "== memory: done in" in stdout and "bench-gpu:" in stdout
    log = (out / "gpu.log").read_text()
    assert log.splitlines()[0] == first and "== optimizers: done in" in log and "gpu_preset_3090: preset=3090" in log
    assert "test_3090_preset_trains_rodin_1b_within_24_gib SKIPPED" in log  # a line per test, as it ends
    copied = [line for line in (out / "RESULTS.md").read_text().splitlines() if line.startswith("| 20")]
    assert copied == [line for line in (tmp_path / "R.md").read_text().splitlines() if line.startswith("| 20")]


def test_what_is_live_at_the_allocators_peak_is_summed_by_where_it_was_allocated():
    from bench.gpu import live_at_peak

    ours = {"filename": os.path.join(ROOT, "rodin", "train", "loop.py"), "line": 40, "name": "forward_backward"}
    torch_frame = {"filename": "/site-packages/torch/optim/_muon.py", "line": 9, "name": "_single_tensor_muon"}

    def event(action, addr, size, frames=()):
        return {"action": action, "addr": addr, "size": size, "frames": list(frames)}

    trace = [event("alloc", 1, 100, [ours]), event("alloc", 2, 50, [torch_frame, ours]), event("alloc", 3, 30, [ours]),
             event("free_requested", 2, 50), event("free_completed", 2, 50), event("alloc", 4, 10, [torch_frame, ours])]
    peak, sites = live_at_peak(trace)
    assert peak == 180  # after the third allocation; the fourth comes after a free of 50
    assert sites == [(130, "rodin/train/loop.py:40 forward_backward"),
                     (50, "_muon.py:9 _single_tensor_muon <- rodin/train/loop.py:40 forward_backward")]


def test_an_item_left_without_time_leaves_a_row_saying_so(tmp_path):
    rows, stdout = bench_gpu(tmp_path, "--only=throughput", "--budget_s=0")
    assert rows == {"gpu_throughput": "status=skipped: 0 s budget spent"}
    assert "== throughput: skipped" in stdout


def test_make_bench_gpu_with_a_given_python_installs_nothing():
    done = subprocess.run(["make", "--no-print-directory", "-n", "bench-gpu", f"PY={sys.executable}", "OUT=/tmp/out", "VENV=/nonexistent"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [sys.executable, "bench/gpu.py", "--out=/tmp/out"]
