"""bench/lora_sft.py --quick: a tiny base exported to HF, fine-tuned fully and with LoRA from that
export, each scored and measured, in one dated row."""

import math

from bench import lora_sft
from bench.results import HEADER
from rodin.config import MODELS
from rodin.model import LLaMA


def test_lora_sft_fine_tunes_one_hf_export_fully_and_with_adapters_and_reports_both(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(HEADER)
    figures = lora_sft.main(["--quick", "--lora_lrs=3e-3", f"--results={results}"])
    row = results.read_text().splitlines()[-1]
    assert "| lora_sft |" in row and "full_names_the_word=" in row and "big_lora_est_gib=" in row
    before = figures["before_val_loss"]
    assert figures["questions"] > 0 and 0 < before < math.log(MODELS["test"].vocab_size) + 1
    for method in ("full", "lora16_lr0.003"):
        assert 0 < figures[f"{method}_val_loss"] < before, method  # both learn from the same start
        assert 0 <= figures[f"{method}_names_the_word"] <= 1 and 0 <= figures[f"{method}_ends_with_im_end"] <= 1, method
        assert figures[f"{method}_rss_mib"] >= 0 and figures[f"{method}_train_s"] > 0, method
    # every weight against rank x (in + out) of the 7 matrices of each of the 2 blocks
    assert figures["full_trainable"] == LLaMA(MODELS["test"]).num_params()
    assert figures["lora16_lr0.003_trainable"] == 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 160) * 3)
    # adapters need neither the weights' gradients nor their optimizer moments
    assert figures["lora16_lr0.003_est_gib"] < figures["full_est_gib"]
    assert 0 < figures["big_lora_est_gib"] < figures["big_full_est_gib"]
    assert figures["big_lora_trainable"] < figures["big_full_trainable"]
