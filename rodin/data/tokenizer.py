"""The tokenizer: rodin's own SentencePiece BPE (tokenizer.model), trained so that llama.cpp and
transformers tokenize exactly as we do, or the tokenizer.json of a published model (read with the
`tokenizers` library, behind the same interface; open_tokenizer picks the class by file).

Frozen decisions (measured: with SentencePiece's defaults only 4 of 12 French sentences
tokenized identically in llama.cpp, with these all of them do):
- normalization "identity": text is NFC-normalised while preparing data, not by the tokenizer;
- whitespace kept as is (no collapsing, no dummy prefix), digits split, byte fallback for the rest;
- ids 0-3 are <unk> <s> </s> <pad>, then the chat tokens as control pieces: they never arise
  from ordinary text, so a user typing "<|im_start|>" cannot forge a turn.
- A run directory keeps its own copy, runs/NAME/tokenizer.model (or tokenizer.json): chat, export,
  eval and SFT look there first, so a run works from any folder and once data/ is gone (its
  fingerprint is checked).
- A tokenizer.json is read only when it is the SentencePiece kind of BPE (byte fallback, "▁" for
  spaces: Lucie-7B's, Llama 2's, Mistral's): llama.cpp reads that kind as a "llama" vocabulary.
  A GPT-2 byte-level BPE is refused. Its special tokens are never parsed from plain text, as
  SentencePiece's control pieces are not; <s> </s> <pad> <unk> are named by the
  tokenizer_config.json beside it (kept in the run's copy too), else Llama's names.
"""

import hashlib
import io
import json
import os
import re

import sentencepiece as spm

from rodin.io import atomic_write_bytes

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# always whole pieces, however rare in the sample: digits, French letters and typography
REQUIRED_CHARS = "0123456789àâäçéèêëîïôöùûüÿœæÀÂÄÇÉÈÊËÎÏÔÖÙÛÜŸŒÆ«»“”’…–—€"
# how often the required characters are fed again, so that SentencePiece's sample keeps them
REQUIRED_CHARS_EVERY = 10_000


def with_required_chars(sentences, every=REQUIRED_CHARS_EVERY):
    """The sentences, with each required character as a sentence of its own, first and again
    every `every` sentences. SentencePiece 0.2.2 aborts (bpe_model_trainer.cc: Check failed:
    freq > 0) when a required character is absent from its sample of input_sentence_size
    sentences: the demo corpus has no « » ’ œ, and the H200 machine's python3 has 0.2.2. A
    one-character sentence holds no pair, so it adds no merge; refed every 10,000 sentences, a
    character survives the sample of 2 M from any number of sentences ~200 times over."""
    singles = list(REQUIRED_CHARS)
    yield from singles
    for i, sentence in enumerate(sentences, 1):
        yield sentence
        if i % every == 0:
            yield from singles


def train_tokenizer(sentences, model_path, vocab_size, num_threads=2, input_sentence_size=2_000_000, seed_sentencepiece_size=1_000_000):
    """Train a BPE model on an iterable of strings (one document or line each) and write it
    atomically to model_path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=with_required_chars(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9999,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        input_sentence_size=input_sentence_size,
        seed_sentencepiece_size=seed_sentencepiece_size,
        shuffle_input_sentence=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        control_symbols=list(CHAT_TOKENS),
        required_chars=REQUIRED_CHARS,
        num_threads=num_threads,
        minloglevel=2,
    )
    atomic_write_bytes(model_path, model.getvalue())


class Tokenizer:
    """rodin's SentencePiece model (tokenizer.model)."""

    run_copy = "tokenizer.model"  # the run directory's own copy

    def __init__(self, model_path, model_bytes=None):
        self.path = str(model_path)
        try:
            if model_bytes is None:
                with open(self.path, "rb") as f:
                    model_bytes = f.read()
            self.model_bytes = model_bytes
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        ids = [self.sp.piece_to_id(t) for t in CHAT_TOKENS]
        known = all(self.sp.id_to_piece(i) == t for i, t in zip(ids, CHAT_TOKENS))
        self.im_start_id, self.im_end_id = ids if known else (None, None)

    @property
    def has_chat_tokens(self):
        return self.im_start_id is not None

    @property
    def fingerprint(self):
        """Identifies the vocabulary: shards and checkpoints record it so a mismatch is caught."""
        return hashlib.sha256(self.model_bytes).hexdigest()[:16]

    def piece(self, i):
        return self.sp.id_to_piece(i)

    def is_special(self, i):
        """A control piece (<s>, </s>, chat tokens) or <unk>: never spelled by text."""
        return self.sp.is_control(i) or self.sp.is_unknown(i)

    def is_byte(self, i):
        return self.sp.is_byte(i)

    def run_files(self):
        """{file name: bytes} the run directory keeps."""
        return {self.run_copy: self.model_bytes}

    def with_chat_tokens(self, path):
        """This tokenizer with <|im_start|> <|im_end|> appended as control pieces (ids vocab_size and
        vocab_size + 1), to be kept at path."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_bytes)
        for token in CHAT_TOKENS:
            proto.pieces.add(piece=token, score=0.0, type=proto.SentencePiece.CONTROL)
        return Tokenizer(path, proto.SerializeToString())

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        # a model's vocabulary may be padded past the tokenizer's (e.g. to a multiple of 64):
        # ids in that padding have no piece and decode to nothing
        return self.sp.decode([i for i in ids if i < self.vocab_size])

    def encode_document(self, text):
        """A pretraining document: <s> text </s>."""
        return [self.bos_id] + self.sp.encode(text) + [self.eos_id]


LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class JsonTokenizer:
    """A Hugging Face tokenizer.json (SentencePiece-style BPE), with Tokenizer's interface."""

    run_copy = "tokenizer.json"
    CONFIG = "tokenizer_config.json"  # beside it: the names of <s> </s> <pad> <unk>, a chat template

    def __init__(self, path, model_bytes=None, config_bytes=None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = str(path)
        try:
            if model_bytes is None:
                with open(self.path, "rb") as f:
                    model_bytes = f.read()
                config_path = os.path.join(os.path.dirname(self.path), self.CONFIG)
                config_bytes = open(config_path, "rb").read() if os.path.exists(config_path) else None
            self.model_bytes, self.config_bytes = model_bytes, config_bytes
            self.tok = HFTokenizer.from_str(self.model_bytes.decode("utf-8"))
            spec = json.loads(self.model_bytes)["model"]
        except Exception as e:  # OSError, JSON errors, and the plain Exception that tokenizers raises
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({(str(e) or type(e).__name__).splitlines()[0]})") from None
        if spec.get("type") != "BPE" or not spec.get("byte_fallback"):
            raise ValueError(f"{self.path}: a {spec.get('type')} tokenizer without byte fallback (GPT-2 byte-level?); rodin reads "
                             "SentencePiece-style BPE tokenizer.json (byte_fallback, '▁' for spaces), as Lucie-7B's")
        self.tok.encode_special_tokens = True  # "<s>" typed in a text is text, as with SentencePiece
        self.config = json.loads(self.config_bytes) if self.config_bytes else {}
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.specials = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        ids = {k: vocab.get(self.special_name(k)) for k in LLAMA_SPECIALS}
        for key in ("bos_token", "eos_token"):
            if ids[key] is None:
                raise ValueError(f"{self.path}: no {key} {self.special_name(key)!r} in the vocabulary; "
                                 f"name it in {self.CONFIG} beside it")
        self.bos_id, self.eos_id, self.unk_id = ids["bos_token"], ids["eos_token"], ids["unk_token"]
        self.pad_id = -1 if ids["pad_token"] is None else ids["pad_token"]  # -1: none, as SentencePiece says
        chat = [vocab.get(t) for t in CHAT_TOKENS]
        self.im_start_id, self.im_end_id = chat if None not in chat else (None, None)

    def special_name(self, key):
        name = self.config.get(key, LLAMA_SPECIALS[key])
        return name.get("content") if isinstance(name, dict) else name

    @property
    def has_chat_tokens(self):
        return self.im_start_id is not None

    @property
    def fingerprint(self):
        """Identifies the vocabulary and which of its tokens are <s> </s> <pad> <unk>."""
        ids = f"{self.bos_id},{self.eos_id},{self.pad_id},{self.unk_id}".encode()
        return hashlib.sha256(self.model_bytes + ids).hexdigest()[:16]

    def piece(self, i):
        return self.tok.id_to_token(i)

    def is_special(self, i):
        return i in self.specials or i == self.unk_id

    def is_byte(self, i):
        return bool(BYTE_PIECE.fullmatch(self.tok.id_to_token(i) or ""))

    def run_files(self):
        files = {self.run_copy: self.model_bytes}
        if self.config_bytes is not None:
            files[self.CONFIG] = self.config_bytes
        return files

    def with_chat_tokens(self, path):
        """This tokenizer with <|im_start|> <|im_end|> added as special tokens (the next two ids), to
        be kept at path (its tokenizer_config.json beside it)."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self.model_bytes.decode("utf-8"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
        return JsonTokenizer(path, tok.to_str().encode("utf-8"), self.config_bytes)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=True)

    def encode_document(self, text):
        """A pretraining document: <s> text </s>."""
        return [self.bos_id] + self.encode(text) + [self.eos_id]


def open_tokenizer(path):
    """The tokenizer of a file (tokenizer.json: JsonTokenizer, else a SentencePiece model), or of a
    model directory (its tokenizer.model, else its tokenizer.json)."""
    path = str(path)
    if os.path.isdir(path):
        for name in (Tokenizer.run_copy, JsonTokenizer.run_copy):
            if os.path.exists(os.path.join(path, name)):
                return open_tokenizer(os.path.join(path, name))
        raise ValueError(f"{path}: no tokenizer.model or tokenizer.json in this directory; give the tokenizer's file")
    return JsonTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def copy_into_run(tokenizer, run_dir):
    """Keep the tokenizer in the run directory (atomically; rewritten only when it differs)."""
    for name, data in tokenizer.run_files().items():
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read() == data:
                    continue
        atomic_write_bytes(path, data)
    return os.path.join(run_dir, tokenizer.run_copy)


def checkpoint_tokenizer(ckpt, meta, explicit=None):
    """The tokenizer a checkpoint was trained with: `explicit` if given (it must match), else the
    run directory's copy, else the path recorded in its config (relative to where training ran).
    Every candidate is checked against the fingerprint the checkpoint recorded."""
    recorded = meta.get("tokenizer")
    if explicit:
        tokenizer = open_tokenizer(explicit)
        if recorded and recorded != tokenizer.fingerprint:
            raise ValueError(f"{explicit}: not the vocabulary {ckpt} was trained with (fingerprint {tokenizer.fingerprint}, "
                             f"checkpoint {recorded}); pass --tokenizer=the run's tokenizer.model")
        return tokenizer
    run_dir = os.path.dirname(os.path.dirname(os.path.normpath(str(ckpt))))  # runs/NAME/checkpoints/step-N
    recorded_path = meta["config"]["tokenizer"]
    copy = os.path.join(run_dir, (JsonTokenizer if recorded_path.endswith(".json") else Tokenizer).run_copy)
    candidates = [copy, recorded_path]
    for path in candidates:
        if os.path.exists(path):
            tokenizer = open_tokenizer(path)
            if not recorded or tokenizer.fingerprint == recorded:
                return tokenizer
    raise ValueError(f"{ckpt}: its tokenizer (fingerprint {recorded}) is neither {candidates[0]} nor {candidates[1]}; "
                     "pass --tokenizer=the tokenizer.model it was trained with")
