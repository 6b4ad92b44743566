"""rodin/train/budget.py: the money a run spends over all its launches, its cap, and what finishing costs.
Time is the fake step_clock of conftest.py, so every figure is exact."""

import pytest
from safetensors.torch import load_file
from test_train import metrics, run_train

from rodin.config import SFT_PRESETS, parse_args
from rodin.train import budget, checkpoint
from rodin.train.budget import Budget


def tensors(run_dir, name):
    return load_file(f"{checkpoint.latest(run_dir)}/{name}.safetensors")


def test_the_cap_stops_a_run_a_relaunch_at_the_same_cap_trains_nothing_and_a_higher_cap_continues_bit_identically(
        demo_data, tmp_path, step_clock, webhook, capsys):
    step_clock.seconds = lambda n: 3600.0  # every step holds the GPU for an hour
    priced = ["--max_steps=10", "--price_per_hour=1.5"]
    straight = run_train(demo_data, tmp_path / "a", *priced)  # a price without a cap only reports
    url, events = webhook
    capped = run_train(demo_data, tmp_path / "b", *priced, "--max_cost=6", f"--notify={url}")
    # 1.5 a step: the 4th step reaches the cap; the checkpoint carries what was spent
    assert checkpoint.read_meta(checkpoint.latest(capped))["budget"] == {
        "gpu_hours": 4.0, "seconds": 14400.0, "cost": 6.0, "price_per_hour": 1.5, "max_cost": 6.0, "seconds_per_step": 3600.0}
    assert ("budget: 6.00 spent of --max_cost=6 (4.00 GPU-hours) at step 4; checkpoint written. To continue, relaunch "
            "with a higher --max_cost: about 9.00 more finishes the run at the current speed (--max_cost=15)") in capsys.readouterr().out
    assert [e["event"] for e in events] == ["start", "checkpoint", "budget"]
    assert {k: events[-1][k] for k in ("step", "reason", "cost", "cost_to_finish", "gpu_hours")} == {
        "step": 4, "reason": "budget", "cost": 6.0, "cost_to_finish": 9.0, "gpu_hours": 4.0}

    # the same cap again: not one step, and it says so
    run_train(demo_data, tmp_path / "b", *priced, "--max_cost=6", f"--notify={url}")
    assert "at step 4; no step trained. To continue, relaunch with a higher --max_cost" in capsys.readouterr().out
    assert [checkpoint.step_of(p) for p in checkpoint.complete_checkpoints(capped)] == [4]
    assert step_clock.steps == 10 + 4

    # a cap that does not exceed what was spent is refused before the first step
    with pytest.raises(ValueError, match=r"^--max_cost=5 does not exceed the 6\.00 this run has already spent"):
        run_train(demo_data, tmp_path / "b", *priced, "--max_cost=5")

    # a higher cap continues where the cap stopped it, as if it had never stopped
    run_train(demo_data, tmp_path / "b", *priced, "--max_cost=100")
    for name in ("model", "optimizer"):
        a, b = tensors(straight, name), tensors(capped, name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    losses = lambda run: [(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(run)]  # noqa: E731
    assert losses(straight) == losses(capped)
    assert checkpoint.read_meta(checkpoint.latest(capped))["budget"]["cost"] == 15.0  # both launches, nothing twice
    # what was spent and what finishing costs, step by step, in metrics.jsonl
    for run in (straight, capped):
        records = metrics(run)[1:]
        assert [(r["gpu_hours"], r["cost"], r["cost_to_finish"]) for r in records] == [
            (step, 1.5 * step, 1.5 * (10 - step)) for step in range(1, 11)]


def test_each_launch_pays_its_own_price_for_all_its_gpus(step_clock):
    first = Budget(price_per_hour=2.0, max_cost=0, world_size=8)
    step_clock.now += 1800  # half an hour on 8 GPUs
    record = first.state_dict()
    assert (record["gpu_hours"], record["cost"]) == (4.0, 8.0) and not budget.reached(record)
    second = Budget(price_per_hour=3.0, max_cost=11, world_size=1)  # moved to one dearer GPU, with a cap
    second.load_state_dict(record)
    assert not second.spent_before_launch() and not second.exhausted()
    step_clock.now += 3600
    assert (second.hours(), second.spent()) == (5.0, 11.0) and second.exhausted()
    assert budget.reached(second.state_dict())


@pytest.mark.parametrize("presets", [None, SFT_PRESETS], ids=["train", "sft"])
def test_bad_money_and_checkpoint_options_are_refused_in_one_line_naming_the_option(presets):
    parse = lambda *args: parse_args(["--preset=test", *args], **({"presets": presets} if presets else {}))  # noqa: E731
    with pytest.raises(ValueError, match=r"^--max_cost=5 needs --price_per_hour \(") as caught:
        parse("--max_cost=5")
    assert "\n" not in str(caught.value)
    for key in ("ckpt_every_minutes", "keep_every", "price_per_hour", "max_cost"):
        with pytest.raises(ValueError, match=rf"^--{key}=-1 is negative"):
            parse(f"--{key}=-1", *(["--price_per_hour=1"] if key == "max_cost" else []))
    assert parse("--price_per_hour=2.5").max_cost == 0  # a price alone is allowed: it only reports
