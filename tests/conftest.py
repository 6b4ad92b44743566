"""Shared fixtures: a slice of the shipped corpus, a small tokenizer trained on it, and shards."""

import dataclasses
import gzip
import itertools
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CORPUS = os.path.join(ROOT, "data", "littre-citations.txt.gz")

from rodin import checkpoint  # noqa: E402
from rodin.config import MODELS, PRESETS, config_to_dict  # noqa: E402
from rodin.model import LLaMA  # noqa: E402
from rodin.optim import make_optimizer  # noqa: E402
from rodin.tokenizer import Tokenizer  # noqa: E402

# the test models are tiny: a second intra-op thread only adds contention on a shared 2-core machine
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


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
