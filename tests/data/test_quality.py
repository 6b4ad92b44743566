"""rodin/data/quality.py: every French quality rule keeps good French and drops its own negative example."""

import copy
import textwrap

import pytest

from rodin.data.quality import RULES, check, ocr_noise, repair, words_of

GOOD = (
    "La ville de Lyon est située au confluent du Rhône et de la Saône. Elle est connue pour sa cuisine, "
    "ses traboules et la fête des Lumières, qui attire chaque année des visiteurs venus de toute l'Europe.\n"
    "Au Moyen Âge, la cité était un grand centre de commerce et d'imprimerie ; les foires y réunissaient "
    "des marchands italiens, allemands et flamands.\n"
    "Aujourd'hui, le quartier ancien est inscrit au patrimoine mondial de l'Unesco. On y flâne le long des quais, "
    "on visite la basilique de Fourvière et l'on goûte une quenelle dans un bouchon « typique ».\n"
    "Les habitants, qu'on appelle les Lyonnais, disent volontiers que leur ville compte trois fleuves : "
    "le Rhône, la Saône… et le beaujolais !"
)
LINES = GOOD.split("\n")
CITIES = "Lyon Paris Nantes Rennes Lille Metz Nancy Dijon Reims Caen Brest Tours Blois Albi Rodez Sète Agde Arles Nîmes Millau".split()

NEGATIVE = {
    "min_words": "Le chat dort sur la table de la cuisine.",
    "max_words": "\n".join([GOOD] * 1000),
    "avg_word_length": " ".join(["de", "extraordinairementincompréhensibles"] * 30),
    "symbol_ratio": GOOD + " " + " ".join(f"#{c.lower()}" for c in CITIES),
    "bullet_lines": "\n".join("- " + line for line in LINES),
    "ellipsis_lines": "\n".join(line.rstrip(".!") + "…" for line in LINES),
    "alpha_words": GOOD + " " + " ".join(str(n) for n in range(10, 50)),
    "stop_words": "Soleil radieux, montagnes enneigées, rivières claires, forêts profondes, villages paisibles. " * 8,
    "lorem_ipsum": GOOD + " Lorem ipsum dolor sit amet.",
    "curly_bracket": GOOD + " function() { return 1; }",
    "dup_lines": "\n".join(LINES + [LINES[0]] * 3),
    "dup_paragraphs": GOOD + "\n\nVoir aussi la page suivante.\n\nVoir aussi la page suivante.",
    "top_ngrams": GOOD + " " + "la ville " * 20,
    "dup_ngrams": LINES[0] + " " + LINES[0] + "\n" + "\n".join(LINES[1:]),
    "line_punct": "\n".join(line.rstrip(".!»… ") for line in LINES),
    "short_lines": "\n".join(line + "." for line in textwrap.wrap(GOOD.replace("\n", " "), width=28)),
    "char_dup": GOOD + "\nVoir aussi la page suivante.\nVoir aussi la page suivante.",
    "new_lines": ("Le fleuve traverse lentement Orléans.\nLa cathédrale domine fièrement Chartres.\n"
                  "Les vignobles entourent paisiblement Beaune.\nUn marché anime joyeusement Sarlat.\n"
                  "Une citadelle protège solidement Besançon.\nDes remparts encerclent toujours Carcassonne.\n"
                  "Le port accueille volontiers Honfleur.\nLa lavande parfume doucement Valensole.\n"
                  "Les falaises bordent superbement Étretat.\nUn pont enjambe élégamment Avignon.\n"
                  "Des canaux sillonnent gracieusement Colmar.\nLe mistral balaie souvent Marseille.\n"
                  "La neige recouvre parfois Chamonix.\nLes cigognes nichent volontiers Strasbourg.\n"
                  "Un carillon résonne souvent Dunkerque."),
    "ocr_noise": GOOD.replace("Rhône", "R h ô n e").replace("commerce", "c0mmerce").replace("marchands", "rnrchnds")
                     .replace("quartier", "q u a r t i e r").replace("patrimoine", "p4trim0ine").replace("cité", "c1té")
                     .replace("ville", "v i l l e").replace("Lumières", "Lumi~res").replace("quenelle", "qu3nelle")
                     .replace("habitants", "hab1tants").replace("visiteurs", "v1siteurs").replace("Saône", "S a ô n e"),
    "language": ("La ciudad de Sevilla es la capital de Andalucía y una de las más bellas de España. En sus calles "
                 "se encuentran la catedral, la Giralda y el Real Alcázar, que atraen cada año a millones de visitantes. "
                 "Durante la primavera, la ciudad celebra la Semana Santa y la Feria de Abril, dos fiestas conocidas en "
                 "todo el mundo por su música, sus trajes y su alegría."),
}


def rules_for(name):
    rules = copy.deepcopy(RULES)
    rules["ocr_noise"]["enabled"] = name == "ocr_noise"
    return rules


def test_every_rule_has_a_negative_example():
    assert set(NEGATIVE) == set(RULES)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_rule_keeps_good_french_and_drops_its_negative_example(rule):
    rules = rules_for(rule)
    assert check(GOOD, rules) is None
    assert check(NEGATIVE[rule], rules) == rule
    rules[rule]["enabled"] = False
    assert check(NEGATIVE[rule], rules) != rule  # switching a rule off is honoured


def test_lines_ending_in_guillemets_or_ellipsis_count_as_punctuated():
    # C4's end-punctuation rule would delete these lines; our line_punct keeps them
    text = "\n".join(line.rstrip(".!") + (" »" if i % 2 else "…") for i, line in enumerate(LINES))
    assert check(text, {"line_punct": RULES["line_punct"]}) is None


def test_french_spaced_punctuation_is_not_counted_as_words():
    assert words_of("Quoi ! tu pars ? « Oui » : demain.") == ["Quoi", "tu", "pars", "Oui", "demain."]


def test_ocr_noise_scores_debris_above_clean_text():
    assert ocr_noise(words_of(GOOD)) < 0.02
    assert ocr_noise(words_of(NEGATIVE["ocr_noise"])) > RULES["ocr_noise"]["max"]


def test_repair_fixes_mojibake_and_keeps_french_typography():
    assert repair("Ã‰tÃ© Ã  la plage, cafÃ© crÃ¨me") == "Été à la plage, café crème"
    typographic = "L’été « beau » — très… bien, n’est-ce pas ?"
    assert repair(typographic) == typographic
    assert repair("e\u0301te\u0301\r\nligne\x00 \u200b\n\n\n\nfin  ") == "été\nligne\n\nfin"
