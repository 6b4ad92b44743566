"""Every preset of rodin, in one place, and the `--key=value` command line that overrides them.

A run is described by one TrainConfig (which holds its ModelConfig). Presets are named
TrainConfigs; `--preset=NAME` picks one, `--model=NAME` swaps in a named model shape, and
`--key=value` / `--model.key=value` override single fields, typed by the dataclass.
"""

import dataclasses
import json
from dataclasses import dataclass, field

from rodin.model import ModelConfig

MUON_ORTHOGONALISERS = ("newton_schulz", "polar_express")  # rodin/train/muon.py

MODELS = {
    # RODIN-1B: 1,238,415,360 parameters
    "rodin-1b": ModelConfig(dim=2048, n_layers=22, n_heads=16, n_kv_heads=16, ffn_dim=5461, vocab_size=64000,
                            max_seq_len=2048, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True),
    # Lucie-7B (Llama-3.1 shape): 6,706,958,336 parameters
    "lucie-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=12288, vocab_size=65024,
                            max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False),
    # small enough to learn French words on 2 CPU cores in a few minutes: 2.4 M parameters. At make
    # pretrain's ~500 s the run is compute-bound far from Chinchilla's 20 tokens a parameter, so a
    # narrower model that takes more steps learns more (1 thread, the same seconds: dim 256 800 steps
    # 1.537 bpb, dim 192 1130 steps 1.510, dim 192 x 5 layers 990 steps 1.513, dim 128 1660 steps 1.519)
    "demo": ModelConfig(dim=192, n_layers=4, n_heads=6, n_kv_heads=3, ffn_dim=512, vocab_size=4096,
                        max_seq_len=256, rope_theta=10000.0, tie_embeddings=True),
    # for tests: milliseconds per step
    "test": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=512,
                        max_seq_len=64, rope_theta=10000.0, tie_embeddings=True),
}


def check_guard_options(cfg):
    """The guard's options (TrainConfig and SFTConfig), each named with the range it takes."""
    if cfg.spike_factor <= 1:
        raise ValueError(f"--spike_factor={cfg.spike_factor:g}: must exceed 1 (3 is the usual value)")
    for key in ("spike_steps", "max_rollbacks"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    if cfg.spike_window < 10 or cfg.max_skipped < 0:
        raise ValueError(f"--spike_window={cfg.spike_window} must be at least 10 steps and --max_skipped={cfg.max_skipped} "
                         "at least 0")
    if not 0 < cfg.rollback_lr_factor <= 1:
        raise ValueError(f"--rollback_lr_factor={cfg.rollback_lr_factor:g}: must be in (0, 1] (1: the LR unchanged)")


def check_spot_options(cfg):
    """The options of checkpoints by the clock, milestones and the budget (TrainConfig and SFTConfig)."""
    for key in ("ckpt_every_minutes", "keep_every", "price_per_hour", "max_cost"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"--{key}={getattr(cfg, key):g} is negative; give 0 (off) or a positive value")
    if cfg.max_cost > 0 and cfg.price_per_hour <= 0:
        raise ValueError(f"--max_cost={cfg.max_cost:g} needs --price_per_hour (what one GPU costs an hour, in the "
                         "currency of the cap): without a price nothing is counted against it")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: MODELS["demo"])
    # data: shards written by data/encode.py
    data_dir: str = "data/demo"
    tokenizer: str = "data/demo/tokenizer.model"
    seq_len: int = 256
    micro_batch_size: int = 16  # --micro_batch_size=auto (stored as 0): the largest that fits the device (rodin/train/memory.py)
    grad_accum_steps: int = 1
    # > 0: sequences per optimizer step over all processes, stated once for every card and world
    # size; grad_accum_steps is then derived from it, the micro-batch and the number of processes
    global_batch: int = 0
    memory_gib: float = 0.0  # what --micro_batch_size=auto may fill on one device; 0: the device's memory
    memory_margin: float = 0.1  # kept free of the estimate for the allocator, the CUDA context, fragmentation
    # optimisation: linear warmup then `schedule` down to min_lr at max_steps
    max_steps: int = 1000
    stop_at_step: int = 0  # > 0: checkpoint and exit at this step, to continue later (the schedule still ends at max_steps)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd (stable, then linear to min_lr over decay_steps) | linear (to min_lr) | constant
    decay_steps: int = 0  # wsd: length of the final decay
    # batch-size ramp-up (Lucie: 256 -> 1024 sequences by 64): the global batch starts at rampup_start
    # sequences and grows by rampup_increment in equal stages until rampup_steps; 0: full batch from step 0
    rampup_start: int = 0
    rampup_increment: int = 0
    rampup_steps: int = 0
    # adamw: AdamW on every parameter. muon: Muon (orthogonalised momentum) on the blocks' attention
    # and FFN matrices, AdamW (lr, betas, weight_decay) on embeddings, an untied output and gains;
    # lr carries over (Moonlight's RMS-matching rule, rodin/train/muon.py)
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton–Schulz iterations
    muon_weight_decay: float = 0.1
    # Muon's 2026 variants, each off until bench/recipe.py measures it helping on cpu-demo (docs/recipe.md)
    muon_orthogonalise: str = "newton_schulz"  # newton_schulz (torch's one quintic, muon_ns_steps times) | polar_express (five quintics)
    muon_normuon: bool = False  # NorMuon: each row of the update scaled by its running RMS (also under FSDP2)
    muon_cautious_weight_decay: bool = False  # decay a weight only where its update pulls it toward zero too
    # Muon's momentum from muon_momentum_start up to muon_momentum over the first steps (modded-nanogpt); 0: none
    muon_momentum_warmup_steps: int = 0
    muon_momentum_start: float = 0.85
    # AdamW's matrices at their own lr: the token embeddings (with a tied output) and an untied output
    # at lr x scale, along the same schedule (modded-nanogpt trains its embedding and head apart)
    embedding_lr_scale: float = 1.0
    output_lr_scale: float = 1.0
    grad_clip: float = 1.0
    seed: int = 1337
    # the guard (rodin/train/guard.py): a non-finite step is not applied; a spike (the loss above
    # spike_factor x the median of the last spike_window losses for spike_steps steps in a row, or more
    # than max_skipped non-finite steps in spike_window) rolls back to the newest checkpoint before it,
    # past its data, with the LR x rollback_lr_factor until the spike's step; max_rollbacks without
    # recovery stop the run as diverged
    guard: bool = True
    spike_factor: float = 3.0
    spike_steps: int = 3
    spike_window: int = 100
    max_skipped: int = 10
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    # a new phase from another run's checkpoint (a run directory or a step-N directory): its weights,
    # and its optimizer moments if init_optimizer; step, schedule and data start afresh. The model may
    # differ in max_seq_len and rope_theta only (context extension). Or a Hugging Face Llama (a directory
    # with config.json and safetensors, or hf:ORG/NAME[@revision] from the Hub): its shape and tokenizer
    # replace the preset's. init_optimizer: auto takes the optimizer state where there is one (a rodin
    # checkpoint, no LoRA), false the weights alone; true where there is none (an HF model, new adapters) is refused
    init_from: str = ""
    init_optimizer: str = "auto"
    # LoRA (rodin/train/lora.py): > 0 freezes the --init_from base (bf16 on CUDA) and trains adapters of this
    # rank, scaled by lora_alpha / lora_rank, on the blocks' matrices of lora_targets (attn: q, k, v, o; ffn:
    # gate, up, down) with AdamW; checkpoints hold the adapters alone, export merges them into the weights
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "attn,ffn"
    # the embedding (and untied output) matrices train whole beside the adapters, in fp32 (peft's modules_to_save):
    # on the demo (a quarter of it is its embedding) SFT LoRA r16 names the word in 39 % of replies against 7 %
    # (full fine-tuning 75 %; docs/sft.md); at 7 B it would cost 8 GiB a 24 GiB card lacks: off by default
    lora_train_embeddings: bool = False
    # LoRA+: the adapters' B matrices at lr x this (its paper: 16). Demo SFT (docs/sft.md): 16 x 2e-3 held-out
    # 2.80 and 5 % of replies naming the word, against 2.74 and 7 % at 1e-2 alone: not a default
    lora_b_lr_scale: float = 1.0
    # memory savers (each changes memory or speed, not results)
    activation_checkpointing: str = "none"  # none | full (every block) | half (every other block) | ops (recompute all but matmuls and attention)
    optimizer_in_backward: bool = False  # step each parameter as its gradient completes, then free it; needs grad_accum_steps=1, grad_clip=0
    loss_chunk: int = 0  # > 0: cross-entropy over this many positions at a time; full fp32 logits never exist
    compile: str = "auto"  # auto: on CUDA, and on a CPU for runs of 500 steps or more (distributed.compiles) | on | off
    fp8: str = "off"  # off | auto (tensorwise where the card has FP8 and dim >= fp8_min_dim) | tensorwise | rowwise: the blocks' matmuls in FP8 (rodin/train/fp8.py)
    fp8_min_dim: int = 2048  # --fp8=auto's smallest model dim (a guess from torchao's H100 tables until bench/gpu.py's fp8 item measures it)
    compile_scope: str = "auto"  # blocks (each block its graph) | whole (the model with its head and loss) | auto: whole on one process, blocks under FSDP2 (measured: distributed.compile_scope)
    check_memory: bool = True  # on CUDA, refuse before the first step a run whose estimated peak exceeds the card (rodin/train/preflight.py)
    # run directory, evaluation, checkpoints
    out_dir: str = "runs"
    name: str = "demo"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20  # held-out batches of micro_batch_size x processes, or with --global_batch of the global batch
    ckpt_every: int = 250
    ckpt_every_minutes: float = 0.0  # > 0: also checkpoint once this many minutes have passed since the last one (rank 0's clock)
    keep_checkpoints: int = 2
    keep_every: int = 0  # > 0: checkpoints at multiples of this step are milestones, always written and never pruned
    # spot machines: a durable copy of every checkpoint (any fsspec URL: s3://, gs://, hf://, a mounted
    # path) that a fresh machine resumes from, and a webhook told of start/checkpoint/stop/crash/finish
    mirror: str = ""
    notify: str = ""
    mirror_timeout_s: float = 900.0  # a mirror that has taken no checkpoint for this long is reported down; the run's end waits this long for its last upload
    # money (rodin/train/budget.py): the price of one GPU for an hour, in any currency, and a cap on what the run
    # spends over all its launches (0: none); at the cap it checkpoints and exits 0. A price alone only reports.
    price_per_hour: float = 0.0
    max_cost: float = 0.0
    sample_every: int = 0  # 0: only at the end
    sample_tokens: int = 60
    # hardware
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast where native (cuda from compute capability 8.0, CPUs with AVX512-BF16 or AMX), else fp32
    wandb: str = "offline"  # offline | online | disabled
    tqdm: bool = True

    def __post_init__(self):
        if self.keep_checkpoints < 2:
            raise ValueError("keep_checkpoints must be >= 2: the newest checkpoint may be mid-write when a machine dies")
        check_optimizer(self)
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds the model's max_seq_len={self.model.max_seq_len}")
        if self.schedule not in ("cosine", "wsd", "linear", "constant"):
            raise ValueError(f"schedule={self.schedule!r}: choose cosine, wsd, linear or constant")
        if self.schedule == "wsd" and not 0 < self.decay_steps <= self.max_steps - self.warmup_steps:
            raise ValueError(f"schedule=wsd needs 0 < decay_steps <= max_steps - warmup_steps, got decay_steps={self.decay_steps}")
        if self.activation_checkpointing not in ("none", "full", "half", "ops"):
            raise ValueError(f"activation_checkpointing={self.activation_checkpointing!r}: choose none, full, half or ops")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--dtype={self.dtype}: choose auto, fp32 or bf16")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile={self.compile!r}: choose auto, on or off")
        if self.fp8 not in ("off", "auto", "tensorwise", "rowwise"):
            raise ValueError(f"--fp8={self.fp8!r}: choose off, auto, tensorwise or rowwise")
        self.init_optimizer = str(self.init_optimizer).lower()  # config.json of runs before it was tri-state: a bool
        if self.init_optimizer not in ("auto", "true", "false"):
            raise ValueError(f"--init_optimizer={self.init_optimizer}: choose auto, true or false")
        if self.compile_scope not in ("auto", "blocks", "whole"):
            raise ValueError(f"--compile_scope={self.compile_scope!r}: choose auto, blocks or whole")
        if self.micro_batch_size < 0 or self.global_batch < 0 or not 0 <= self.memory_margin < 1:
            raise ValueError("--micro_batch_size and --global_batch must be positive (or --micro_batch_size=auto), "
                             "--memory_margin in [0, 1)")
        if self.optimizer_in_backward and (self.grad_accum_steps != 1 or self.grad_clip > 0 or self.rampup_start):
            raise ValueError("optimizer_in_backward steps each parameter during backward: it needs --grad_accum_steps=1, "
                             "--grad_clip=0 and no batch ramp-up (gradients are gone before they could be summed or clipped)")
        if self.rampup_start and not (0 < self.rampup_increment and 0 < self.rampup_steps < self.max_steps):
            raise ValueError("batch ramp-up needs rampup_increment > 0 and 0 < rampup_steps < max_steps")
        check_spot_options(self)
        check_guard_options(self)
        check_lora_options(self)


LORA_TARGETS = ("attn", "ffn")  # rodin.train.lora.TARGETS names their matrices


def check_lora_options(cfg):
    if not cfg.lora_rank:
        return
    if cfg.lora_rank < 0 or cfg.lora_alpha <= 0:
        raise ValueError(f"--lora_rank={cfg.lora_rank} --lora_alpha={cfg.lora_alpha}: both must be positive (e.g. 16 and 32)")
    targets = cfg.lora_targets.split(",")
    if not targets or not set(targets) <= set(LORA_TARGETS):
        raise ValueError(f"--lora_targets={cfg.lora_targets}: choose among {', '.join(LORA_TARGETS)} (comma-separated)")
    if not cfg.init_from:
        raise ValueError(f"--lora_rank={cfg.lora_rank} needs a base: add --init_from=RUN or a Hugging Face model")
    if cfg.optimizer != "adamw":
        raise ValueError(f"--lora_rank={cfg.lora_rank}: adapters are trained with AdamW (Muon is not applied to them); "
                         "add --optimizer=adamw")


def check_optimizer(cfg):
    if cfg.optimizer not in ("adamw", "muon"):
        raise ValueError(f"--optimizer={cfg.optimizer}: choose adamw or muon")
    if not 0 <= cfg.muon_momentum < 1:
        raise ValueError(f"--muon_momentum={cfg.muon_momentum}: must be in [0, 1) (0.95 is the usual value)")
    if cfg.muon_orthogonalise not in MUON_ORTHOGONALISERS:
        raise ValueError(f"--muon_orthogonalise={cfg.muon_orthogonalise}: choose {' or '.join(MUON_ORTHOGONALISERS)}")
    if not 1 <= cfg.muon_ns_steps < 100:
        raise ValueError(f"--muon_ns_steps={cfg.muon_ns_steps}: must be between 1 and 99 (5 is the usual value)")
    if cfg.muon_weight_decay < 0:
        raise ValueError(f"--muon_weight_decay={cfg.muon_weight_decay}: must be >= 0")
    if cfg.muon_momentum_warmup_steps < 0 or not 0 <= cfg.muon_momentum_start < 1:
        raise ValueError(f"--muon_momentum_warmup_steps={cfg.muon_momentum_warmup_steps} --muon_momentum_start="
                         f"{cfg.muon_momentum_start}: steps must be >= 0 and the start in [0, 1) (e.g. 300 and 0.85)")
    if not (cfg.embedding_lr_scale > 0 and cfg.output_lr_scale > 0):
        raise ValueError(f"--embedding_lr_scale={cfg.embedding_lr_scale} --output_lr_scale={cfg.output_lr_scale}: "
                         "both must be > 0 (1: the run's lr)")
    if cfg.lora_b_lr_scale <= 0:
        raise ValueError(f"--lora_b_lr_scale={cfg.lora_b_lr_scale}: must be > 0 (1: the run's lr; LoRA+ uses 16)")
    if cfg.output_lr_scale != 1.0 and cfg.model.tie_embeddings:
        raise ValueError(f"--output_lr_scale={cfg.output_lr_scale}: this model's output is its embedding matrix "
                         "(tie_embeddings): use --embedding_lr_scale")


PRESETS = {
    # make pretrain on a CPU. Muon with bf16 autocast (native on AVX512-BF16/AMX CPUs) and compiled
    # blocks, measured on 2 cores (bench/RESULTS.md, `recipe` and `make_pretrain*` rows): against AdamW
    # in fp32 at its best lr (3e-3), Muon at lr 6e-3 reached AdamW's final held-out bpb of 500 steps
    # in 0.61x the steps with momentum 0.95, 0.54x with 0.9. Then NorMuon (each row's update scaled by
    # its running RMS) with the momentum warmed up 0.85 -> 0.95 over 300 steps: 800 steps to 1.535
    # held-out bpb in 494 s on a 2-core AMD EPYC (680 plain Muon steps at 0.9: 1.575 in 453 s; the
    # limit, 546 s, is what make pretrain took before). The lr is flat around 6e-3 (1 thread, 800
    # steps: 3e-3 1.538, 4e-3 1.536, 6e-3 1.539, 9e-3 1.540); min_lr 0 worse (1.549), micro-batch 8 worse.
    # Then the narrower demo model (dim 192, MODELS' comment): 1130 steps to 1.516 in 499 s (2026-12-06).
    "cpu-demo": TrainConfig(model=MODELS["demo"], seq_len=256, micro_batch_size=16, max_steps=1130, optimizer="muon",
                            muon_momentum=0.95, muon_normuon=True, muon_momentum_start=0.85, muon_momentum_warmup_steps=300,
                            lr=6e-3, min_lr=6e-4, warmup_steps=20, eval_every=100, eval_batches=8, ckpt_every=100,
                            device="cpu"),
    # make pretrain on a GPU: the same data, a model that uses the card; Muon as on the CPU demo
    # (its lr is AdamW's, carried over by the RMS-matching rule; not yet measured on a GPU)
    "gpu-demo": TrainConfig(model=dataclasses.replace(MODELS["rodin-1b"], dim=768, n_layers=12, n_heads=12,
                                                      n_kv_heads=12, ffn_dim=2048, vocab_size=4096, max_seq_len=1024),
                            seq_len=1024, micro_batch_size=16, max_steps=1500, optimizer="muon", lr=1e-3, min_lr=1e-4,
                            warmup_steps=100, eval_every=250, ckpt_every=500),
    # unit tests: fp32 on any CPU, so that paths that must agree are compared at fp32 tolerance
    # (the bf16 paths are tested with --dtype=bf16)
    "test": TrainConfig(model=MODELS["test"], seq_len=32, micro_batch_size=4, max_steps=20, lr=1e-2, min_lr=1e-3,
                        warmup_steps=2, log_every=1, eval_every=10, eval_batches=2, ckpt_every=10, sample_tokens=8,
                        device="cpu", dtype="fp32", wandb="disabled", tqdm=False),
    # RODIN-1B's recipe on any card of 24 GiB or more, one GPU or a node (torchrun), the one command
    # for a 3090 and a B200: a global batch of 512 x 2048 = 1 M tokens as RODIN-1B's, clipped, the
    # micro-batch fitted to the card (--micro_batch_size=auto), every block recomputed. Muon: one
    # moment where AdamW keeps two (5.1 GiB of optimizer state against 9.2, bench/memory_estimate.py),
    # its Newton-Schulz < 1 % of a 1 M-token step, ~2x AdamW's compute efficiency in Moonlight's
    # scaling runs and ~0.6x the steps on cpu-demo. The 3090 and b200 presets are this run tuned to
    # one card: all three write runs/rodin-1b and keep the global batch, so a run moves between them.
    # The fit, estimated: micro-batch 8 on 24 GiB (19.8 GiB; 16 would need 24.5), 64 on 80 GiB (53.4).
    # FP8 where the card has it (4090, H100/H200, B200; not a 3090): torchtitan's +25 % on H100 with
    # float8, not yet measured here (bench/gpu.py's fp8 item).
    "rodin-1b": TrainConfig(model=MODELS["rodin-1b"], data_dir="data/fr", tokenizer="data/fr/tokenizer.model",
                            seq_len=2048, micro_batch_size=0, global_batch=512, max_steps=30000, optimizer="muon",
                            lr=3e-4, min_lr=3e-5, warmup_steps=2000, eval_every=250, eval_batches=2, ckpt_every=100,
                            ckpt_every_minutes=30, activation_checkpointing="full", loss_chunk=2048,
                            memory_margin=0.15, fp8="auto", name="rodin-1b"),
    # RODIN-1B on one 24 GiB card (RTX 3090/4090), now RODIN-1B's own recipe: with Muon's single
    # moment, clipping and accumulation fit (estimated peak 19.8 GiB at micro-batch 8 with every block
    # recomputed and the logits chunked; 18.2 at 4), where AdamW needed optimizer_in_backward without
    # clipping or accumulation (19.3 GiB; with them 22.3). Micro-batch fixed at 8: no estimate at start.
    # bf16 only: a 3090 (compute capability 8.6) has no FP8 matmuls.
    "3090": TrainConfig(model=MODELS["rodin-1b"], data_dir="data/fr", tokenizer="data/fr/tokenizer.model",
                        seq_len=2048, micro_batch_size=8, global_batch=512, max_steps=30000, optimizer="muon",
                        lr=3e-4, min_lr=3e-5, warmup_steps=2000, eval_every=250, eval_batches=2, ckpt_every=100,
                        ckpt_every_minutes=30, activation_checkpointing="full", loss_chunk=2048, name="rodin-1b"),
    # RODIN-1B on B200s (one, or a node under torchrun): no recomputation, the micro-batch fitted to
    # the card (16 by the estimate: 32 would need ~177 GiB without recomputation, 16 ~100), the same
    # global batch of 512 x 2048 on any number of GPUs. FP8 as rodin-1b.
    "b200": TrainConfig(model=MODELS["rodin-1b"], data_dir="data/fr", tokenizer="data/fr/tokenizer.model",
                        seq_len=2048, micro_batch_size=0, global_batch=512, max_steps=30000, optimizer="muon",
                        lr=3e-4, min_lr=3e-5, warmup_steps=2000, eval_every=250, eval_batches=2, ckpt_every=100,
                        ckpt_every_minutes=30, loss_chunk=8192, fp8="auto", name="rodin-1b"),
    # Lucie-7B's shape on one node of 8 80-GB GPUs (torchrun --nproc_per_node=8, FSDP2): 8 x 2 x 64 = 1024
    # sequences of 4096 tokens a step, ramped up from 256 by 64 over ~10 M sequences as Lucie's was, ~3 T
    # tokens in all. Selective recomputation. Muon: its momentum is 3 GiB a GPU less than AdamW's two
    # moments, and Newton-Schulz ~0.4 % of a step's FLOPs (~700 TFLOP over the 224 matrices against
    # ~160 PFLOP of a 4 M-token step); estimated ~39 GiB per GPU (bench/memory_estimate.py --world_size=8).
    "lucie-7b": TrainConfig(model=MODELS["lucie-7b"], data_dir="data/lucie", tokenizer="data/lucie/tokenizer.model",
                            seq_len=4096, micro_batch_size=2, global_batch=1024, max_steps=720000, optimizer="muon",
                            lr=3e-4, min_lr=3e-5, warmup_steps=2000, rampup_start=256, rampup_increment=64,
                            rampup_steps=16450, eval_every=1000, eval_batches=1, ckpt_every=500, ckpt_every_minutes=30,
                            activation_checkpointing="ops", loss_chunk=4096, name="lucie-7b"),
}


@dataclass
class SFTConfig(TrainConfig):
    """A chat fine-tuning run (sft.py). The model shape and the tokenizer are those of the
    checkpoint it starts from (init_from); data_dir is unused."""
    init_from: str = "runs/demo"  # a run directory (its newest checkpoint), one checkpoint directory, or an HF Llama (directory or hf:ORG/NAME[@revision])
    data: str = "data/littre-sft.jsonl.gz"  # a local .jsonl[.gz] in the messages format, or a Hub dataset name
    data_split: str = "train"  # the split of a Hub dataset
    val_fraction: float = 0.02  # held out by a hash of each conversation
    pack: bool = True  # several conversations per row (document masking), else one per row, padded
    truncate: bool = False  # cut conversations longer than seq_len + 1 tokens instead of skipping them
    tokenizer: str = ""  # empty: the tokenizer of the init_from run
    sample_tokens: int = 120  # the longest reply to the held-out questions sampled at the end
    # under --lora_rank, the embedding (and untied output) rows of <|im_start|> and <|im_end|> train too
    # (rodin/train/lora.py RowDeltas): a base never saw them, and without it a base lacking them (Lucie-7B)
    # could not get them under LoRA. Demo SFT: held-out 2.74 against 2.84 frozen (docs/sft.md)
    lora_chat_rows: bool = True

    def __post_init__(self):
        # no seq_len check against the preset's model: sft.py checks it against init_from's model
        if self.keep_checkpoints < 2:
            raise ValueError("keep_checkpoints must be >= 2: the newest checkpoint may be mid-write when a machine dies")
        check_optimizer(self)
        check_spot_options(self)
        check_guard_options(self)
        check_lora_options(self)


SFT_PRESETS = {
    # make sft on a CPU: fine-tunes runs/demo (cpu-demo) in about 3 minutes on 2 AMD EPYC cores (166 s; the dim-256 model 2.5 min on
    # an Intel Xeon). Muon at the pretraining's lr, measured with bench/sft_replies.py on 100 held-out
    # questions (the reply names the word asked about): AdamW lr 1e-3 (the preset before) 2 % after
    # 300 steps, 60 % after 600; Muon lr 3e-3 36 %, lr 6e-3 75 % after 300 steps (held-out loss 2.27
    # against AdamW's 2.61; 73 % on the 680-step momentum-0.9 cpu-demo, 84 % and 2.18 on the 800-step
    # NorMuon one; 80 % and 2.172 on the dim-192 one, in 166 s); Muon lr 3e-3 for 600 steps 82 %: twice
    # the time for a few points more.
    "cpu-demo": SFTConfig(model=PRESETS["cpu-demo"].model, name="demo-sft", seq_len=256, micro_batch_size=16, max_steps=300,
                          optimizer="muon", lr=6e-3, min_lr=6e-4, warmup_steps=20, weight_decay=0.0, eval_every=50,
                          eval_batches=8, ckpt_every=100, device="cpu"),
    # make sft on a GPU: fine-tunes the gpu-demo model; Muon at the pretraining's lr as on the CPU
    # (not yet measured on a GPU)
    "gpu-demo": SFTConfig(model=PRESETS["gpu-demo"].model, name="demo-sft", seq_len=1024, micro_batch_size=16, max_steps=600,
                          optimizer="muon", lr=1e-3, min_lr=1e-4, warmup_steps=30, weight_decay=0.0, eval_every=100,
                          eval_batches=8, ckpt_every=200),
    # Lucie-7B fine-tuned into an assistant on one 24 GiB card (RTX 3090/4090) with LoRA: a full fine-tune
    # needs ~107 GB (fp32 weights, gradients, AdamW moments), this one the base frozen in bf16 (12.5 GiB)
    # and rank-16 adapters on every attention and FFN matrix (38.8 M parameters, 0.6 % of the model;
    # alpha 32, 2 x rank as is usual). Estimated peak (rodin/train/memory.py, bench/memory_estimate.py
    # --sft_preset=lucie-7b-lora-3090; bench/lora_sft.py): 16.8-17.2 GiB at micro-batch 4 x 2048 tokens (20.5 at 8, too close to
    # 24 GiB with the CUDA context and fragmentation) with every block recomputed and the logits chunked;
    # a global batch of 64 rows. The base: the HF export of a lucie-7b run (export.py's default --out)
    # or any Llama fully fine-tuned with the ChatML tokens (sft.py adds them to a tokenizer that lacks them).
    "lucie-7b-lora-3090": SFTConfig(model=MODELS["lucie-7b"], init_from="runs/lucie-7b/export/hf", name="lucie-7b-lora",
                                    seq_len=2048, micro_batch_size=4, global_batch=64, max_steps=1000, optimizer="adamw",
                                    lr=2e-4, min_lr=2e-5, warmup_steps=30, weight_decay=0.0, lora_rank=16, lora_alpha=32.0,
                                    lora_targets="attn,ffn", activation_checkpointing="full", loss_chunk=2048,
                                    eval_every=100, eval_batches=2, ckpt_every=100, ckpt_every_minutes=30),
    # unit tests
    "test": SFTConfig(model=MODELS["test"], name="sft", seq_len=64, micro_batch_size=4, max_steps=20, lr=3e-3,
                      min_lr=3e-4, warmup_steps=2, weight_decay=0.0, log_every=1, eval_every=10, eval_batches=4,
                      ckpt_every=10, sample_tokens=16, device="cpu", dtype="fp32", wandb="disabled", tqdm=False),
}


AUTO = {"micro_batch_size": 0}  # options that take `auto`, and the value that stands for it


def _parse_value(text, current, key):
    if key in AUTO and text == "auto":
        return AUTO[key]
    kind = type(current)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key} expects {kind.__name__}, got {text!r}") from None


def field_comments(cls):
    """{field: the comment on its line} of a config dataclass, from its source: the one place
    each option is explained, shown by --help."""
    import inspect
    import re

    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(klass).splitlines():
            found = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
            if found:
                comments[found.group(1)] = found.group(2)
    return comments


def usage(argv, default_preset, presets):
    """--help: the presets, then every option with its value under the chosen preset (and the
    other options given), and what it does."""
    cfg = parse_args([a for a in argv if a not in ("--help", "-h")], default_preset, presets)
    lines = ["usage: --preset=NAME --model=NAME --key=value --model.key=value ...", "",
             f"presets: {', '.join(presets)} (default {default_preset}); models: {', '.join(MODELS)}", ""]
    for prefix, obj in (("", cfg), ("model.", cfg.model)):
        comments = field_comments(type(obj))
        for f in dataclasses.fields(obj):
            if f.name == "model":
                continue
            value = getattr(obj, f.name)
            lines.append(f"  --{prefix}{f.name}={value}" + (f"   {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def parse_args(argv, default_preset="cpu-demo", presets=PRESETS):
    """Build a TrainConfig from `--preset=NAME --model=NAME --key=value --model.key=value`;
    --help prints every option and exits."""
    if "--help" in argv or "-h" in argv:
        print(usage(argv, default_preset, presets))
        raise SystemExit(0)
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments are --key=value, got {arg!r}")
        pairs.append(arg[2:].split("=", 1))
    preset_name = dict(pairs).get("preset", default_preset)
    if preset_name not in presets:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {', '.join(presets)}")
    cfg = presets[preset_name]
    model = cfg.model
    train_overrides = {}
    for key, text in pairs:
        if key == "preset":
            continue
        if key == "model":
            if text not in MODELS:
                raise ValueError(f"unknown model {text!r}; choose from {', '.join(MODELS)}")
            model = MODELS[text]
        elif key.startswith("model."):
            continue  # applied below, after --model=NAME wherever it stands
        elif key in {f.name for f in dataclasses.fields(cfg)}:
            train_overrides[key] = _parse_value(text, getattr(cfg, key), key)
        else:
            raise ValueError(f"unknown option --{key}")
    model_overrides = {}
    for key, text in pairs:
        if key.startswith("model."):
            name = key[len("model."):]
            if name not in {f.name for f in dataclasses.fields(ModelConfig)}:
                raise ValueError(f"unknown option --{key}")
            model_overrides[name] = _parse_value(text, getattr(model, name), key)
    model = dataclasses.replace(model, **model_overrides)
    return dataclasses.replace(cfg, model=model, **train_overrides)


def config_to_dict(cfg):
    return dataclasses.asdict(cfg)


def config_from_dict(d):
    d = dict(d)
    model = ModelConfig(**d.pop("model"))
    return TrainConfig(model=model, **d)


def save_config(cfg, path):
    from rodin.io import atomic_write_text

    atomic_write_text(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")


def load_config(path):
    with open(path) as f:
        return config_from_dict(json.load(f))
