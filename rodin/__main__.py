"""rodin's own commands, installed with the package as `rodin` (also `python -m rodin`):

    rodin chat runs/demo-sft                                  # talk to a model in the terminal
    rodin eval runs/demo --tasks=french_bench --num_fewshot=3 # lm-evaluation-harness, curves, needle
    rodin report runs/a runs/b --out=report                   # runs side by side
    rodin publish runs/demo --repo=my-org/demo                # a release on the Hugging Face Hub
    rodin supervise --run_dir=runs/NAME -- COMMAND ...        # relaunch a spot run until it completes
    rodin shards data/tokens --full                           # every shard's tokens against their checksums

`rodin COMMAND --help` gives each command's options. The scripts of the pipeline (train.py,
sft.py, export.py, data/*.py) stay scripts: they are what a user edits.
"""

import importlib
import sys

# command: (module whose main(argv) runs it, what it does)
COMMANDS = {
    "chat": ("rodin.eval.chat", "talk to a trained model in the terminal"),
    "eval": ("rodin.eval.harness", "benchmark a run with lm-evaluation-harness; learning curves; needle in a haystack"),
    "report": ("rodin.eval.report", "loss, throughput and scores of runs side by side"),
    "publish": ("rodin.ship.publish", "publish a run as a release on the Hugging Face Hub"),
    "supervise": ("rodin.spot.supervise", "relaunch a training run after a crash or a preemption"),
    "shards": ("rodin.data.shards", "check token shards against their index (--full: every byte)"),
}


def usage():
    width = max(map(len, COMMANDS))
    return "usage: rodin COMMAND [options]   (rodin COMMAND --help)\n\n" + "\n".join(
        f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: rodin {argv[0]}: no such command\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv[0] = f"rodin {argv[0]}"  # argparse's prog in the command's usage line
    try:
        return module.main(argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
