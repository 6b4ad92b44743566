"""On a CUDA device: the `3090` preset (RODIN-1B, context 2048) trains within 24 GiB."""

import json
import os

import pytest
import torch

import train


@pytest.mark.gpu
def test_3090_preset_trains_rodin_1b_within_24_gib(demo_data, tmp_path):
    total = torch.cuda.get_device_properties(0).total_memory
    if total < 24 * 2**30:
        pytest.skip("needs a GPU with at least 24 GiB")
    torch.cuda.set_per_process_memory_fraction(24 * 2**30 / total)
    torch.cuda.reset_peak_memory_stats()
    try:
        # two micro-batches a step, so gradients accumulate as in the preset's 64 (a minute a step)
        argv = ["--preset=3090", "--global_batch=16", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                f"--out_dir={tmp_path}", "--name=run", "--max_steps=3", "--warmup_steps=1", "--log_every=1",
                "--eval_batches=1", "--sample_tokens=4", "--wandb=disabled", "--tqdm=false"]
        assert train.main(argv) == 0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["peak_mem_gib"] < 24 and records[-1]["loss"] < records[1]["loss"] + 1.0
    if "mfu" in records[-1]:  # a GPU in rodin/train/device.py's table
        assert 0 < records[-1]["mfu"] < 1
