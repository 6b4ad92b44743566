"""Stage 5, eval: how good a run is, and talking to it.

lm-evaluation-harness on the run's Hugging Face export (harness, with the offline tasks in
tasks/), learning curves over checkpoints (curves), needle in a haystack (needle), a report of
runs side by side (report), and the terminal chat (chat).

Imports: every stage before it (rodin.model, rodin.config, rodin.io, data, train, spot, ship).
"""
