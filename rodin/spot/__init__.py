"""Stage 3, spot: what keeps a run alive on machines that can vanish.

A durable copy of the checkpoints (mirror), the relaunching supervisor (supervise), the
per-run wiring of mirror, signals and alerts shared by train.py and sft.py (lifeline), and the
webhook alerts themselves (notify).

Imports: rodin.model, rodin.config, rodin.io, rodin.data, rodin.train, and each other; never ship or eval.
"""
