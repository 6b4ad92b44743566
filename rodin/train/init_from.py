"""A run that starts from a Hugging Face Llama (rodin.train.hf_llama): what train.py and sft.py
call to take its shape and tokenizer, load its weights into the run's model and record its origin.

Frozen decisions:
- --init_from is an HF model when it is hf:ORG/NAME[@revision], or a directory with config.json
  that is neither a rodin run nor a checkpoint; its shape and tokenizer replace the preset's.
- Its tokenizer is its tokenizer.model (SentencePiece), else its tokenizer.json (the `tokenizers`
  library, rodin.data.tokenizer.JsonTokenizer), and must fit its embedding rows.
- Its weights are cast to the run's fp32 master weights; under FSDP2 rank 0 reads them and
  broadcasts them into the shards, as a single-process checkpoint.
- The run records the origin in origin.json and in every checkpoint (meta "origin").
- SFT of a model whose tokenizer lacks <|im_start|>/<|im_end|> adds the two tokens (special, the
  next two ids) and grows the embedding and untied output rows, initialised to the mean of the
  existing rows; the run keeps the grown tokenizer. Not the model's own chat template (from its
  tokenizer_config.json): SFT's loss mask, chat, eval, the exports' templates and llama.cpp's
  end-of-turn all rest on ChatML's turns as two single ids, which a foreign Jinja template does not
  give; and a base model (Lucie-7B) has no template anyway. Under LoRA the two rows train beside
  the adapters (rodin.train.lora.RowDeltas); the origin lists them ("added_rows"), so that the base
  loaded again under the adapters (resume, export) is grown alike.
"""

import dataclasses
import json
import os

from rodin.data.tokenizer import JsonTokenizer, Tokenizer, open_tokenizer
from rodin.io import atomic_write_text
from rodin.train.checkpoint import load_hf_weights
from rodin.train.hf_llama import HUB_PREFIX, fetch, origin, read_config

ORIGIN = "origin.json"  # in the run directory: where its weights came from


def is_hf(spec):
    """Whether --init_from names an HF model (hf:ORG/NAME, or a directory with config.json that is
    not a rodin run or checkpoint) rather than a rodin run."""
    spec = str(spec)
    if spec.startswith(HUB_PREFIX):
        return True
    return (os.path.exists(os.path.join(spec, "config.json")) and not os.path.exists(os.path.join(spec, "trainer.json"))
            and not os.path.isdir(os.path.join(spec, "checkpoints")))


def tokenizer_of(path):
    """The tokenizer an HF Llama directory ships: tokenizer.model (SentencePiece), else tokenizer.json."""
    if not any(os.path.exists(os.path.join(path, n)) for n in (Tokenizer.run_copy, JsonTokenizer.run_copy)):
        raise ValueError(f"{path}: no tokenizer.model or tokenizer.json next to config.json; "
                         "download the model's tokenizer files with its weights")
    return open_tokenizer(path)


def check_vocabulary(tokenizer, cfg):
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces do not fit the model's {cfg.vocab_size} "
                         "embedding rows (config.json's vocab_size); use the tokenizer the model was trained with")


def add_chat_tokens(cfg, tokenizer, run_dir):
    """(cfg, tokenizer, new ids) for SFT of an HF model whose tokenizer lacks the ChatML tokens:
    the tokenizer with both added, kept in the run directory, and the model grown to fit them."""
    if cfg.lora_rank and not cfg.lora_chat_rows:
        raise ValueError(f"{tokenizer.path}: no <|im_start|>/<|im_end|> tokens, and with --lora_chat_rows=false their new "
                         "embedding rows would stay frozen; drop --lora_chat_rows=false (their rows then train with the adapters)")
    grown = tokenizer.with_chat_tokens(os.path.join(run_dir, tokenizer.run_copy))
    model = dataclasses.replace(cfg.model, vocab_size=max(cfg.model.vocab_size, grown.vocab_size))
    return dataclasses.replace(cfg, model=model, tokenizer=grown.path), grown, (grown.im_start_id, grown.im_end_id)


def write_origin(run_dir, record):
    atomic_write_text(os.path.join(run_dir, ORIGIN), json.dumps(record, indent=2) + "\n")


def run_config(cfg):
    """(cfg, tokenizer): the run config with the model shape and the tokenizer of an HF --init_from
    (its config.json and tokenizer.model; from the Hub, these small files alone are fetched)."""
    path = fetch(cfg.init_from, weights=False)
    model = read_config(path)
    tokenizer = tokenizer_of(path)
    check_vocabulary(tokenizer, model)
    return dataclasses.replace(cfg, model=model, tokenizer=tokenizer.path), tokenizer


def start(spec, model, is_main, new_ids=()):
    """Load an HF --init_from's weights into the run's model (fetched first if from the Hub), rows
    for the tokens add_chat_tokens added; returns its origin on the main process (hashing the
    weights once), None on the others."""
    path = fetch(spec)
    load_hf_weights(path, model, new_ids)
    if not is_main:
        return None
    # a LoRA run's base is loaded again on resume and export (checkpoint.load_base): with the same rows grown
    return dict(origin(spec, path), **({"added_rows": list(new_ids)} if new_ids else {}))
