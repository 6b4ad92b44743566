"""French text repair and quality rules: named, configurable, each a Gopher/C4/FineWeb rule or ours.

Frozen decisions:
- repair first (ftfy only on documents its badness heuristic flags, quotes never uncurled, so
  ’ « » survive), then NFC, control characters and whitespace; then rules in a fixed order, the
  first that fails names the drop;
- thresholds are FineWeb-2's fra_Latn ones (configs/fra_Latn.yml) where it has them, Gopher's
  and FineWeb-1's defaults elsewhere; no C4 end-punctuation line rule (it deletes lines ending
  in « » » or « … »): FineWeb's document-level line_punct ratio with French terminal marks instead;
- language ID is py3langid, whose model ships inside its wheel (no download at run time). Its
  probabilities are not GlotLID's, so FineWeb-2's 0.824 is not reused: 0.65, FineWeb-1's value.
"""

import re
import unicodedata
from collections import Counter

import ftfy

# FineWeb-2 fra_Latn stop words (a document needs at least 2 of them)
STOP_WORDS = frozenset("de la le et à en l' des du les est d' un une il dans par au".split())
TERMINAL = tuple(".!?…»\"”:;)")  # French lines end on these too
BOILERPLATE = ("javascript", "cookies", "politique de confidentialité", "conditions générales d'utilisation",
               "mentions légales", "tous droits réservés")

# name -> parameters; a rule is switched off with enabled=False or clean.py --disable=name
RULES = {
    "min_words": {"min": 50},                          # Gopher
    "max_words": {"max": 100_000},                     # Gopher
    "avg_word_length": {"min": 2, "max": 11},          # FineWeb-2 fra_Latn
    "symbol_ratio": {"max": 0.1},                      # Gopher: # and … per word
    "bullet_lines": {"max": 0.9},                      # Gopher
    "ellipsis_lines": {"max": 0.3},                    # Gopher
    "alpha_words": {"min": 0.812},                     # FineWeb-2 fra_Latn max_non_alpha_words_ratio
    "stop_words": {"min": 2},                          # Gopher, FineWeb-2 French list
    "lorem_ipsum": {},                                 # C4
    "curly_bracket": {},                               # C4
    "dup_lines": {"max": 0.264, "max_chars": 0.2},     # Gopher repetition, FineWeb-2 fra_Latn
    "dup_paragraphs": {"max": 0.3, "max_chars": 0.2},  # Gopher repetition
    "top_ngrams": {"max": {2: 0.161, 3: 0.149, 4: 0.134}},  # FineWeb-2 fra_Latn
    "dup_ngrams": {"max": {5: 0.15, 6: 0.141, 7: 0.131, 8: 0.121, 9: 0.111, 10: 0.1}},  # FineWeb-2 fra_Latn
    "line_punct": {"min": 0.1},                        # FineWeb-2 fra_Latn line_punct_thr
    "short_lines": {"max": 0.67, "chars": 30},         # FineWeb
    "char_dup": {"max": 0.01},                         # FineWeb: chars in duplicated lines
    "new_lines": {"max": 0.185},                       # FineWeb-2 fra_Latn new_line_ratio (lines per word)
    "ocr_noise": {"max": 0.25, "enabled": False},      # ours; clean.py turns it on for OCR sources
    "language": {"min": 0.65, "chars": 2000},          # py3langid probability of French, on the first 2,000 chars
}

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\u00ad]")
_WORD = re.compile(r"\w+(?:['’]\w*)?", re.UNICODE)
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»…—–’‘“”•·"
_HAS_LETTER = re.compile(r"[^\W\d_]")
_FTFY = ftfy.TextFixerConfig(uncurl_quotes=False, fix_character_width=False, normalization="NFC", explain=False)


# UTF-8 read as Latin-1 or cp1252 always leaves a lead byte (Â-ï) before a continuation byte
# (C1 controls, ¡-¿, or cp1252's punctuation): ftfy's costlier badness test runs only where one is
_MOJIBAKE_PAIR = re.compile("[\u00c2-\u00ef][\u0080-\u00bf\u20ac\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030"
                            "\u0160\u2039\u0152\u017d\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161"
                            "\u203a\u0153\u017e\u0178]")


def repair(text, stats=None):
    """Mojibake repair (flagged documents only), NFC, control characters, whitespace."""
    if _MOJIBAKE_PAIR.search(text) and ftfy.badness.is_bad(text):
        fixed = ftfy.fix_text(text, _FTFY)
        if fixed != text and stats is not None:
            stats["mojibake_repaired"] += 1
        text = fixed
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def remove_boilerplate_lines(text):
    """C4's line filter, French: drop lines that speak of javascript, cookies or legal notices."""
    lowered = text.lower()
    if not any(b in lowered for b in BOILERPLATE):
        return text
    lines = text.split("\n")
    kept = [line for line in lines if not any(b in line.lower() for b in BOILERPLATE)]
    return "\n".join(kept) if len(kept) != len(lines) else text


def words_of(text):
    """Whitespace-separated words, without the lone punctuation marks of French typography
    (« ! », « ? », « : », « » »), which Gopher's ratios would otherwise count as non-alphabetic words."""
    return [w for w in text.split() if w.strip(_PUNCTUATION)]


def _dup_fraction(items):
    """Fraction of items that repeat an earlier one, and fraction of their characters (Gopher)."""
    seen, dup_items, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        seen.add(item)
    total_chars = sum(len(i) for i in items) or 1
    return dup_items / max(len(items), 1), dup_chars / total_chars


def _top_ngram_fraction(words, n):
    grams = Counter(zip(*(words[i:] for i in range(n))))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / max(sum(map(len, words)), 1)


def _dup_ngram_fraction(words, n):
    """Characters of words covered by an n-gram seen before (each word counted once), Gopher-style."""
    seen, covered = set(), [False] * len(words)
    for i, gram in enumerate(zip(*(words[k:] for k in range(n)))):
        if gram in seen:
            covered[i : i + n] = [True] * n
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / max(sum(map(len, words)), 1)


_FRENCH_SINGLE = set("aàyôoA") | set("ÀYÔO")


def ocr_noise(words):
    """Fraction of words that look like OCR debris: stray single letters, letters mixed with digits,
    odd symbols inside a word, long runs without a vowel."""
    bad = n = 0
    for raw in words:
        word = raw.strip(".,;:!?«»()[]\"“”'’-—–…")
        if not word:
            continue
        n += 1
        letters = sum(c.isalpha() for c in word)
        digits = sum(c.isdigit() for c in word)
        if (len(word) == 1 and word.isalpha() and word not in _FRENCH_SINGLE and not raw.endswith(("'", "’"))
                or letters and digits
                or any(not (c.isalnum() or c in "'’-") for c in word)
                or len(word) >= 4 and word.isalpha() and not re.search("[aeiouyàâäéèêëîïôöùûüœæ]", word.lower())
                or re.search(r"(.)\1\1", word)):
            bad += 1
    return bad / max(n, 1)


_LANGID = None


def french_probability(text):
    global _LANGID
    if _LANGID is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, prob = _LANGID.classify(text)
    return prob if lang == "fr" else 0.0


def check(text, rules):
    """The name of the first rule the document fails, or None; rules maps name -> parameters."""
    def on(name):
        return name in rules and rules[name].get("enabled", True)

    words = words_of(text)
    n_words = len(words)
    lines = [line for line in text.split("\n") if line.strip()]
    if on("min_words") and n_words < rules["min_words"]["min"]:
        return "min_words"
    if on("max_words") and n_words > rules["max_words"]["max"]:
        return "max_words"
    if on("avg_word_length") and n_words:
        avg = sum(map(len, words)) / n_words
        if not rules["avg_word_length"]["min"] <= avg <= rules["avg_word_length"]["max"]:
            return "avg_word_length"
    if on("symbol_ratio") and (text.count("#") + text.count("…") + text.count("...")) / max(n_words, 1) > rules["symbol_ratio"]["max"]:
        return "symbol_ratio"
    if on("bullet_lines") and lines and sum(l.lstrip().startswith(("•", "-", "*", "‣", "◦")) for l in lines) / len(lines) > rules["bullet_lines"]["max"]:
        return "bullet_lines"
    if on("ellipsis_lines") and lines and sum(l.rstrip().endswith(("…", "...")) for l in lines) / len(lines) > rules["ellipsis_lines"]["max"]:
        return "ellipsis_lines"
    if on("alpha_words") and n_words and sum(map(bool, map(_HAS_LETTER.search, words))) / n_words < rules["alpha_words"]["min"]:
        return "alpha_words"
    if on("stop_words"):
        found = sum(w in STOP_WORDS or w[:2] in ("l'", "d'", "l’", "d’") for w in _WORD.findall(text.lower()))
        if found < rules["stop_words"]["min"]:
            return "stop_words"
    if on("lorem_ipsum") and "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    if on("curly_bracket") and "{" in text:
        return "curly_bracket"
    if on("dup_lines"):
        frac, chars = _dup_fraction(lines)
        if frac > rules["dup_lines"]["max"] or chars > rules["dup_lines"]["max_chars"]:
            return "dup_lines"
    if on("dup_paragraphs"):
        frac, chars = _dup_fraction([p.strip() for p in re.split(r"\n{2,}", text) if p.strip()])
        if frac > rules["dup_paragraphs"]["max"] or chars > rules["dup_paragraphs"]["max_chars"]:
            return "dup_paragraphs"
    if on("top_ngrams"):
        for n, limit in rules["top_ngrams"]["max"].items():
            if _top_ngram_fraction(words, int(n)) > limit:
                return "top_ngrams"
    if on("dup_ngrams"):
        limits = sorted((int(n), limit) for n, limit in rules["dup_ngrams"]["max"].items())
        smallest = _dup_ngram_fraction(words, limits[0][0])
        # words under a repeated (n+1)-gram are under repeated n-grams too: the fraction only falls
        # with n, so when the smallest n passes every limit, the longer n-grams need no counting
        if smallest > min(limit for _, limit in limits):
            for n, limit in limits:
                if (smallest if n == limits[0][0] else _dup_ngram_fraction(words, n)) > limit:
                    return "dup_ngrams"
    if on("line_punct") and lines and sum(l.rstrip().endswith(TERMINAL) for l in lines) / len(lines) < rules["line_punct"]["min"]:
        return "line_punct"
    if on("short_lines") and lines and sum(len(l) <= rules["short_lines"]["chars"] for l in lines) / len(lines) > rules["short_lines"]["max"]:
        return "short_lines"
    if on("char_dup") and len(lines) > 1 and _dup_fraction(lines)[1] > rules["char_dup"]["max"]:
        return "char_dup"
    if on("new_lines") and n_words and text.count("\n") / n_words > rules["new_lines"]["max"]:
        return "new_lines"
    if on("ocr_noise") and ocr_noise(words) > rules["ocr_noise"]["max"]:
        return "ocr_noise"
    if on("language") and french_probability(text[: rules["language"]["chars"]]) < rules["language"]["min"]:
        return "language"
    return None
