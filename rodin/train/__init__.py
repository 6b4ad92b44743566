"""Stage 2, train: the step loop that train.py and sft.py share, and all it stands on.

What the device can do and which precision it runs in (device), whether a run fits before it
starts (preflight, memory), the optimizers (optim, muon), the loss over a large vocabulary (loss),
recomputation (activation_checkpoint), low-rank adapters (lora), one process or many (distributed), checkpoints
(checkpoint), a start from a Hugging Face Llama (hf_llama reads it, init_from starts a run from
it), the loop (loop), the run's record (runlog, bits_per_byte) and its money (budget).

Imports: rodin.model, rodin.config, rodin.io, rodin.data, and each other; never spot, ship or eval.
"""
