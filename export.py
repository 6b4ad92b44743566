"""Export a run's newest checkpoint to Hugging Face transformers or to GGUF (llama.cpp, Ollama),
then prove the export right by loading it in transformers or llama.cpp.

    python export.py runs/demo --format=hf --dtype=bf16 --out=runs/demo/export/hf
    python export.py runs/demo --format=gguf --dtype=q8_0 --out=runs/demo/export/gguf
    ollama create rodin-demo -f runs/demo/export/gguf/Modelfile && ollama run rodin-demo

Frozen decisions:
- One pure-Python command: no llama.cpp checkout or converter script. GGUF f32/f16/bf16/q8_0 are
  written by the `gguf` package; K-quants (q4_k_m, q5_k_m, q6_k) by llama.cpp's quantizer.
- The checkpoint must match its tokenizer (fingerprint recorded at training) and hold finite
  weights; anything else is refused before a file is written.
- --verify (default) compares the export with our model on French prompts (token ids, logits,
  argmax, greedy continuation), prints the figures and exits 1 past rodin.ship.verify.THRESHOLDS.
"""

import argparse
import os
import sys

from rodin.ship import verify
from rodin.ship.gguf_export import K_QUANTS, PYTHON_TYPES, ffn_warning, modelfile, pad_ffn, write_gguf_file
from rodin.ship.hf import DTYPES, write_hf
from rodin.train.checkpoint import load_run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory (runs/<name>) or one checkpoint directory (…/checkpoints/step-N)")
    parser.add_argument("--format", choices=["hf", "gguf"], required=True)
    parser.add_argument("--dtype", choices=list(DTYPES) + [t for t in PYTHON_TYPES if t not in DTYPES] + list(K_QUANTS),
                        help="default: bf16 for hf, f16 for gguf")
    parser.add_argument("--out", help="output directory (default: <run>/export/<format>)")
    parser.add_argument("--name", help="model name (default: the run's name)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the run directory's copy, else the path its config recorded)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="load the export in transformers / llama.cpp and compare with our model")
    parser.add_argument("--pad_ffn", action="store_true", help="gguf: zero-pad the FFN to a multiple of 256 so K-quants apply")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="hf: split the weights above this size")
    parser.add_argument("--license", default="apache-2.0", help="licence named in the model card")
    parser.add_argument("--data", help="the training data, as the model card describes it (default: the run's data_dir)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (verification, K-quants)")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.format == "hf" else "f16")
    if args.format == "hf" and dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype} is for GGUF; Hugging Face exports take {', '.join(DTYPES)}")
    run = args.run.rstrip("/")
    out = args.out or os.path.join(run, "export", args.format)

    model, tokenizer, meta, ckpt = load_run(run, args.tokenizer)
    cfg = model.cfg
    name = args.name or (meta["config"]["name"] if "step-" in os.path.basename(run) else os.path.basename(run))
    print(f"{ckpt}: step {meta['step']}, {model.num_params():,} parameters, tokenizer {tokenizer.path}")

    if args.format == "hf":
        info = {"license": args.license, "data": args.data or f"token shards of `{meta['config']['data_dir']}`",
                "steps": meta["step"], "tokens seen": f"{meta.get('tokens_seen', 0):,}"}
        write_hf(out, model, tokenizer, dtype, name, info, max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")
        if args.verify:
            report = verify.check_transformers(out, model, tokenizer, dtype)
            return finish("transformers", dtype, report)
        return 0

    os.makedirs(out, exist_ok=True)
    if args.pad_ffn:
        model = pad_ffn(model)
        print(f"ffn_dim padded with zeros: {cfg.ffn_dim} -> {model.cfg.ffn_dim}")
    elif (warning := ffn_warning(cfg)) and dtype in K_QUANTS:
        print(f"warning: {warning}")
    path = write_gguf_file(out, model, tokenizer, dtype, name, args.license, args.threads)
    with open(os.path.join(out, "Modelfile"), "w") as f:
        f.write(modelfile(path, tokenizer, cfg.max_seq_len))
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB) and {os.path.join(out, 'Modelfile')}")
    print(f"ollama: cd {out} && ollama create {name} -f Modelfile && ollama run {name}")
    if args.verify:
        report = verify.check_llama_cpp(path, model, tokenizer, dtype, args.threads)
        return finish("llama.cpp", dtype, report)
    return 0


def finish(checker, dtype, report):
    print(verify.summary(checker, dtype, report))
    problems = verify.failures(report, checker, dtype)
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
