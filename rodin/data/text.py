"""Reading documents from text files: .txt (a document per line), .jsonl (a "text" field), gzipped or not.

All text is NFC-normalised here, once, because the tokenizer does no normalisation of its own
(llama.cpp would not repeat it).
"""

import gzip
import json
import unicodedata
import zlib

# data/encode.py's default for plain files: `make pretrain` holds out these documents of the shipped
# corpus, and the offline eval task (rodin/eval/tasks/littre_cloze.py) is built from them
FILES_VAL_FRACTION = 0.02


def open_text(path):
    return gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")


def read_documents(path, text_field="text"):
    """Yields NFC-normalised, non-empty documents of a .txt[.gz] or .jsonl[.gz] file."""
    is_jsonl = ".jsonl" in str(path)
    with open_text(path) as f:
        for line_number, line in enumerate(f, 1):
            if is_jsonl:
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{line_number}: not a JSON object with a {text_field!r} string ({e})") from None
            else:
                text = line.rstrip("\n")
            text = unicodedata.normalize("NFC", text)
            if text.strip():
                yield text


def is_validation(text, val_fraction):
    """A stable train/validation split: decided by a hash of the document, not by its position."""
    return zlib.crc32(text.encode("utf-8")) % 1_000_000 < val_fraction * 1_000_000
