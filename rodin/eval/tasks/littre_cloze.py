"""littre_cloze: a French multiple-choice task for lm-evaluation-harness, made from the shipped
corpus, so the evaluation path runs offline (tests, CPU) where the Hub tasks cannot.

Each item is a Littré quotation without its last word and four candidate words: the true one and
the last words of three other quotations. The test items are every usable quotation of the
corpus's validation split (the documents `make pretrain` holds out: data/encode.py's split), so a
demo model never trained on them; the 4 few-shot examples come from the training split.
Regenerate littre_cloze.jsonl with: python -m rodin.eval.tasks.littre_cloze
"""

import json
import os
import random
import re

from rodin.data.text import FILES_VAL_FRACTION, is_validation, read_documents

HERE = os.path.dirname(os.path.abspath(__file__))
ITEMS = os.path.join(HERE, "littre_cloze.jsonl")
CORPUS = os.path.join(HERE, "..", "..", "..", "data", "littre-citations.txt.gz")
QUOTE = re.compile(r"^(?P<text>.+?) (?P<word>[a-zàâäçéèêëîïôöùûüÿœæ]{5,12})\s*(?:[.!?;,]\s*)?\((?P<author>[^()]+)\)$")


def quotations(corpus=CORPUS, val_fraction=FILES_VAL_FRACTION):
    """(split, text without its last word, last word) of the corpus's usable quotations, in order.
    The split is the one data/encode.py gives the document (the whole line)."""
    for doc in read_documents(corpus):
        m = QUOTE.match(doc.strip())
        if m and 40 <= len(m["text"]) <= 160:
            yield ("val" if is_validation(doc, val_fraction) else "train"), m["text"], m["word"]


def make_items(corpus=CORPUS, n_fewshot=4, seed=0):
    """Every validation quotation as a test item (shuffled with a seed, so --limit takes a random
    sample), and n_fewshot training quotations as examples; distractors are other validation words."""
    found = list(quotations(corpus))
    test = [(text, word) for split, text, word in found if split == "val"]
    rng = random.Random(seed)
    fewshot = rng.sample([(text, word) for split, text, word in found if split == "train"], n_fewshot)
    rng.shuffle(test)
    words = sorted({word for _, word in test})
    items = []
    for split, chosen in (("train", fewshot), ("test", test)):
        for text, word in chosen:
            choices = [word] + rng.sample([w for w in words if w != word], 3)
            rng.shuffle(choices)
            items.append({"split": split, "context": text, "choices": choices, "label": choices.index(word)})
    return items


def load(**kwargs):
    """custom_dataset of littre_cloze.yaml: the shipped items as a DatasetDict (train, test)."""
    import datasets

    with open(ITEMS, encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    return datasets.DatasetDict({split: datasets.Dataset.from_list([i for i in items if i["split"] == split])
                                 for split in ("train", "test")})


if __name__ == "__main__":
    from rodin.io import atomic_write_text

    items = make_items()
    atomic_write_text(ITEMS, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    print(f"wrote {ITEMS}: {sum(i['split'] == 'test' for i in items)} test items, {sum(i['split'] == 'train' for i in items)} few-shot")
