"""bench/data_stages.py --quick runs every stage and reports a throughput for each."""

from bench import data_stages


def test_the_quick_data_bench_reports_every_stage(tmp_path):
    results = tmp_path / "RESULTS.md"
    figures = data_stages.main(["--quick", f"--results={results}"])
    for stage in ("download", "clean", "mix", "tokenizer", "encode", "encode_loop_1p", "encode_loop_2p", "encode_speedup_2p"):
        assert figures[stage] > 0, stage
    assert "data_stages --quick" in results.read_text().splitlines()[-1]
