"""SentencePiece BPE tokenizer, trained so that llama.cpp and transformers tokenize exactly as we do.

Frozen decisions (measured: with SentencePiece's defaults only 4 of 12 French sentences
tokenized identically in llama.cpp, with these all of them do):
- normalization "identity": text is NFC-normalised while preparing data, not by the tokenizer;
- whitespace kept as is (no collapsing, no dummy prefix), digits split, byte fallback for the rest;
- ids 0-3 are <unk> <s> </s> <pad>, then the chat tokens as control pieces: they never arise
  from ordinary text, so a user typing "<|im_start|>" cannot forge a turn.
- A run directory keeps its own copy, runs/NAME/tokenizer.model: chat, export, eval and SFT look
  there first, so a run works from any folder and once data/ is gone (its fingerprint is checked).
"""

import hashlib
import io
import os

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
    def __init__(self, model_path):
        self.path = str(model_path)
        try:
            with open(self.path, "rb") as f:
                self.model_bytes = f.read()
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
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

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        # a model's vocabulary may be padded past the tokenizer's (e.g. to a multiple of 64):
        # ids in that padding have no piece and decode to nothing
        return self.sp.decode([i for i in ids if i < self.vocab_size])

    def encode_document(self, text):
        """A pretraining document: <s> text </s>."""
        return [self.bos_id] + self.sp.encode(text) + [self.eos_id]


RUN_COPY = "tokenizer.model"  # the run directory's own copy


def copy_into_run(tokenizer, run_dir):
    """Keep the tokenizer in the run directory (atomically; rewritten only when it differs)."""
    path = os.path.join(run_dir, RUN_COPY)
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == tokenizer.model_bytes:
                return path
    atomic_write_bytes(path, tokenizer.model_bytes)
    return path


def checkpoint_tokenizer(ckpt, meta, explicit=None):
    """The tokenizer a checkpoint was trained with: `explicit` if given (it must match), else the
    run directory's copy, else the path recorded in its config (relative to where training ran).
    Every candidate is checked against the fingerprint the checkpoint recorded."""
    recorded = meta.get("tokenizer")
    if explicit:
        tokenizer = Tokenizer(explicit)
        if recorded and recorded != tokenizer.fingerprint:
            raise ValueError(f"{explicit}: not the vocabulary {ckpt} was trained with (fingerprint {tokenizer.fingerprint}, "
                             f"checkpoint {recorded}); pass --tokenizer=the run's tokenizer.model")
        return tokenizer
    run_dir = os.path.dirname(os.path.dirname(os.path.normpath(str(ckpt))))  # runs/NAME/checkpoints/step-N
    candidates = [os.path.join(run_dir, RUN_COPY), meta["config"]["tokenizer"]]
    for path in candidates:
        if os.path.exists(path):
            tokenizer = Tokenizer(path)
            if not recorded or tokenizer.fingerprint == recorded:
                return tokenizer
    raise ValueError(f"{ckpt}: its tokenizer (fingerprint {recorded}) is neither {candidates[0]} nor {candidates[1]}; "
                     "pass --tokenizer=the tokenizer.model it was trained with")
