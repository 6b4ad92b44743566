"""Shared fixtures: a slice of the shipped corpus, a small tokenizer trained on it, and shards."""

import dataclasses
import gzip
import itertools
import json
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CORPUS = os.path.join(ROOT, "data", "littre-citations.txt.gz")
LITTRE_SFT = os.path.join(ROOT, "data", "littre-sft.jsonl.gz")

from rodin.config import MODELS, PRESETS, config_to_dict  # noqa: E402
from rodin.data.tokenizer import Tokenizer  # noqa: E402
from rodin.model import LLaMA  # noqa: E402
from rodin.train import checkpoint  # noqa: E402
from rodin.train.optim import make_optimizer  # noqa: E402

# the test models are tiny: a second intra-op thread only adds contention on a shared 2-core machine
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# the handlers of SIGTERM, SIGINT and SIGUSR1 before any test (rodin.train.loop.StopFlag.SIGNALS)
DEFAULT_HANDLERS = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """A run in this process (train.main, sft.main, also in a module fixture) keeps SIGTERM, SIGINT
    and SIGUSR1 for its stop flag. Each test starts and ends with the default handlers again, or the
    workers a process pool forks (data/encode.py) would shrug off Pool.terminate's SIGTERM, a hang,
    and Ctrl-C would not stop pytest."""
    for s, handler in DEFAULT_HANDLERS.items():
        signal.signal(s, handler)
    yield
    for s, handler in DEFAULT_HANDLERS.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def corpus_slice(tmp_path_factory):
    """The first 6,000 quotations of the shipped corpus, as a .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        path.write_text("".join(itertools.islice(f, 6000)), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory, corpus_slice):
    """Tokenizer (vocab of the `test` model) and train/val shards, made by the data scripts."""
    from data import encode, train_tokenizer

    out = tmp_path_factory.mktemp("demo")
    tokenizer = str(out / "tokenizer.model")
    train_tokenizer.main([corpus_slice, f"--vocab_size={MODELS['test'].vocab_size}", f"--out={tokenizer}", "--threads=2"])
    encode.main([corpus_slice, f"--tokenizer={tokenizer}", f"--out_dir={out}", "--workers=2", "--val_fraction=0.05"])
    return {"dir": str(out), "tokenizer": tokenizer}


LUCIE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_lucie_like_tokenizer(lines, path, vocab_size):
    """A tokenizer.json of Lucie-7B's kind, trained with the `tokenizers` library as Lucie's was
    (OpenLLM-France/Lucie-Training, tokenization/tokenizer_train.py): BPE with byte fallback and
    <0xNN> pieces, "▁" for spaces with a prefix before each text, digits and punctuation split
    while training, then the pre-tokenizer dropped and the byte pieces kept out of the special
    tokens; <unk> <s> </s> <pad> are ids 0-3 and there are no chat tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"▁?[^\w\s▁]+|[\n\t]"), "isolated"),
                                                 pre_tokenizers.Split("▁", "merged_with_next"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LUCIE_SPECIALS + byte_pieces,
                                                       min_frequency=2, limit_alphabet=200, show_progress=False))
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in LUCIE_SPECIALS]
    spec["pre_tokenizer"] = None  # no piece crosses a split: merging the whole text gives the same pieces
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return str(path)


@pytest.fixture(scope="session")
def lucie_like_tokenizer(tmp_path_factory, corpus_slice):
    """A tokenizer.json of Lucie-7B's kind (train_lucie_like_tokenizer), of the test model's vocabulary."""
    with open(corpus_slice, encoding="utf-8") as f:
        lines = f.readlines()
    return train_lucie_like_tokenizer(lines, tmp_path_factory.mktemp("lucie") / "tokenizer.json", MODELS["test"].vocab_size)


def save_transformers_llama(out, tokenizer_path, dtype=torch.float32, max_shard_size="1GB"):
    """A LlamaForCausalLM made and saved by transformers itself (random weights, safetensors): the
    test shape with GQA, untied embeddings, RoPE θ 500,000 and wide weights (std 0.1, clear argmaxes),
    and a SentencePiece tokenizer.model beside it, or a tokenizer.json saved by transformers (with
    its tokenizer_config.json). Returns the transformers model."""
    import shutil

    import transformers

    shape = MODELS["test"]
    config = transformers.LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.dim, intermediate_size=shape.ffn_dim,
                                      num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads, num_key_value_heads=2,
                                      max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    if str(tokenizer_path).endswith(".json"):
        unk, bos, eos, pad = LUCIE_SPECIALS
        transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), unk_token=unk, bos_token=bos, eos_token=eos,
                                             pad_token=pad).save_pretrained(str(out))
    else:
        shutil.copy(tokenizer_path, os.path.join(str(out), "tokenizer.model"))
    return model


@pytest.fixture(scope="session")
def transformers_llama(demo_data, tmp_path_factory):
    """(directory, model) of save_transformers_llama with the demo_data tokenizer; do not modify it."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf") / "llama"
    return str(out), save_transformers_llama(out, demo_data["tokenizer"])


@pytest.fixture(scope="session")
def transformers_llama_json(lucie_like_tokenizer, corpus_slice, tmp_path_factory):
    """(directory, model, data) of save_transformers_llama with the Lucie-like tokenizer.json, and
    train/val shards of the corpus slice encoded for it by data/encode.py; do not modify them."""
    pytest.importorskip("transformers")
    from data import encode

    out = tmp_path_factory.mktemp("hf-json") / "llama"
    model = save_transformers_llama(out, lucie_like_tokenizer)
    data = tmp_path_factory.mktemp("hf-json-data")
    encode.main([corpus_slice, f"--tokenizer={out}", f"--out_dir={data}", "--workers=1", "--val_fraction=0.05"])
    return str(out), model, str(data)


@pytest.fixture
def webhook():
    """A JSON webhook on 127.0.0.1: yields (url, list of the payloads it received)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def make_run(root, tokenizer_path, tied=True, kv_heads=2, name="run", step=3, seed=0, meta=None, keep=2, **model_overrides):
    """A run directory holding a checkpoint of a tiny random model at `step` (weights drawn with
    `seed`, meta added to the checkpoint's); returns (run_dir, model)."""
    model_cfg = dataclasses.replace(MODELS["test"], **{"tie_embeddings": tied, "n_kv_heads": kv_heads, "max_seq_len": 128,
                                                       "init_std": 0.1, **model_overrides})
    cfg = dataclasses.replace(PRESETS["test"], model=model_cfg, tokenizer=tokenizer_path, name=name)
    torch.manual_seed(seed)
    model = LLaMA(model_cfg).eval()
    meta = {"config": config_to_dict(cfg), "tokenizer": Tokenizer(tokenizer_path).fingerprint, "tokens_seen": 0, **(meta or {})}
    run_dir = os.path.join(str(root), name)
    checkpoint.save(run_dir, step, model, make_optimizer(model, 1e-3, 0.1, (0.9, 0.95)), meta, keep=keep)
    return run_dir, model


@pytest.fixture
def step_clock(monkeypatch):
    """A fake wall clock for rodin.train.loop (checkpoints by the clock) and rodin.train.budget (money) that
    moves only while a training step runs: the n-th step of this process takes step_clock.seconds(n)
    seconds (0 until a test sets it), so runs that depend on time are exact and instant."""
    from rodin.train import budget, loop

    class StepClock:
        now, steps = 0.0, 0

        def seconds(self, n):
            return 0.0

        def __call__(self):
            return self.now

    clock = StepClock()
    real_step = loop.forward_backward

    def timed_step(*args, **kwargs):
        clock.steps += 1
        clock.now += clock.seconds(clock.steps)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "clock", clock)
    monkeypatch.setattr(budget, "clock", clock)
    monkeypatch.setattr(loop, "forward_backward", timed_step)
    return clock


def littre_slice(n, max_answer_chars=100):
    """The first n conversations of the shipped SFT data without a system turn and with a short
    answer, as JSONL lines: they fit the test model's context."""
    with gzip.open(LITTRE_SFT, "rt", encoding="utf-8") as f:
        lines = (line for line in f if (m := json.loads(line)["messages"])[0]["role"] != "system"
                 and len(m[-1]["content"]) <= max_answer_chars)
        return list(itertools.islice(lines, n))


def write_jsonl(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) + "\n"
                            for line in lines), encoding="utf-8")
    return str(path)
