"""Labelled true/false statements for the demo, generated from templates and small tables of facts, in the
spirit of the "internal state of an LLM knows when it's lying" probes (Azaria & Mitchell 2023).

Every fact yields one true statement and one false one built from the same template, with the false value
drawn from the same table (another country's capital, a wrong sum, another animal's class), so that every
value word appears on both sides and a probe cannot separate the classes by vocabulary alone. The set is
balanced (half true) and deterministic in `seed`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Statement", "make_statements", "TOPICS", "FACT_GROUP_PATTERN"]

#: groups the two statements of one fact: ids "f0012a" and "f0012b" share "f0012"
FACT_GROUP_PATTERN = r"^(f\d+)"


@dataclass(frozen=True)
class Statement:
    id: str
    text: str
    label: int  # 1 true, 0 false
    topic: str


# (country, capital, continent, language)
_COUNTRIES = [
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("Greece", "Athens", "Europe", "Greek"),
    ("Poland", "Warsaw", "Europe", "Polish"), ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"), ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Hungary", "Budapest", "Europe", "Hungarian"), ("Austria", "Vienna", "Europe", "German"),
    ("Ireland", "Dublin", "Europe", "English"), ("Netherlands", "Amsterdam", "Europe", "Dutch"),
    ("Russia", "Moscow", "Europe", "Russian"), ("Turkey", "Ankara", "Asia", "Turkish"),
    ("Japan", "Tokyo", "Asia", "Japanese"), ("China", "Beijing", "Asia", "Chinese"),
    ("South Korea", "Seoul", "Asia", "Korean"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("India", "New Delhi", "Asia", "Hindi"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian"), ("Iran", "Tehran", "Asia", "Persian"),
    ("Egypt", "Cairo", "Africa", "Arabic"), ("Kenya", "Nairobi", "Africa", "Swahili"),
    ("Nigeria", "Abuja", "Africa", "English"), ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic"), ("Ghana", "Accra", "Africa", "English"),
    ("Canada", "Ottawa", "North America", "English"), ("Mexico", "Mexico City", "North America", "Spanish"),
    ("Cuba", "Havana", "North America", "Spanish"), ("United States", "Washington", "North America", "English"),
    ("Brazil", "Brasilia", "South America", "Portuguese"), ("Argentina", "Buenos Aires", "South America", "Spanish"),
    ("Peru", "Lima", "South America", "Spanish"), ("Chile", "Santiago", "South America", "Spanish"),
    ("Colombia", "Bogota", "South America", "Spanish"), ("Australia", "Canberra", "Oceania", "English"),
    ("New Zealand", "Wellington", "Oceania", "English"),
]

_ANIMALS = [
    ("dog", "mammal"), ("cat", "mammal"), ("horse", "mammal"), ("whale", "mammal"), ("bat", "mammal"),
    ("cow", "mammal"), ("lion", "mammal"), ("dolphin", "mammal"), ("eagle", "bird"), ("sparrow", "bird"),
    ("penguin", "bird"), ("owl", "bird"), ("parrot", "bird"), ("ostrich", "bird"), ("salmon", "fish"),
    ("shark", "fish"), ("trout", "fish"), ("tuna", "fish"), ("cod", "fish"), ("snake", "reptile"),
    ("lizard", "reptile"), ("crocodile", "reptile"), ("turtle", "reptile"), ("iguana", "reptile"),
    ("ant", "insect"), ("bee", "insect"), ("butterfly", "insect"), ("beetle", "insect"), ("mosquito", "insect"),
    ("frog", "amphibian"), ("toad", "amphibian"), ("salamander", "amphibian"),
]

_ELEMENTS = [
    ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"), ("sodium", "Na"),
    ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"), ("sulfur", "S"), ("chlorine", "Cl"),
    ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"),
    ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"), ("tin", "Sn"), ("uranium", "U"), ("neon", "Ne"),
    ("platinum", "Pt"),
]

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                 "twenty", "twenty-one", "twenty-two", "twenty-three"]

TOPICS = ("capital", "continent", "language", "animal", "element", "arithmetic", "comparison")


def _the(country: str) -> str:
    """The country's name as it reads inside a sentence ("the United States")."""
    return f"the {country}" if country in ("United States", "Netherlands") else country


def _other(rng: random.Random, values: list[str], true_value: str) -> str:
    """A value from `values` that differs from `true_value`."""
    choices = [v for v in values if v != true_value]
    return rng.choice(choices)


def _pairs(seed: int) -> list[tuple[str, str, str]]:
    """(topic, true text, false text) for every fact."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []
    capitals = [c[1] for c in _COUNTRIES]
    continents = sorted({c[2] for c in _COUNTRIES})
    languages = sorted({c[3] for c in _COUNTRIES})
    for country, capital, continent, language in _COUNTRIES:
        name = _the(country)
        out.append(("capital", f"The capital of {name} is {capital}.",
                    f"The capital of {name} is {_other(rng, capitals, capital)}."))
        out.append(("continent", f"{name[0].upper()}{name[1:]} is a country in {continent}.",
                    f"{name[0].upper()}{name[1:]} is a country in {_other(rng, continents, continent)}."))
        out.append(("language", f"Most people in {name} speak {language}.",
                    f"Most people in {name} speak {_other(rng, languages, language)}."))
    classes = sorted({a[1] for a in _ANIMALS})
    for animal, cls in _ANIMALS:
        article = "An" if cls[0] in "aeiou" else "A"
        wrong = _other(rng, classes, cls)
        wrong_article = "an" if wrong[0] in "aeiou" else "a"
        out.append(("animal", f"The {animal} is {article.lower()} {cls}.", f"The {animal} is {wrong_article} {wrong}."))
    symbols = [e[1] for e in _ELEMENTS]
    for element, symbol in _ELEMENTS:
        out.append(("element", f"The chemical symbol of {element} is {symbol}.",
                    f"The chemical symbol of {element} is {_other(rng, symbols, symbol)}."))
    # distinct operand pairs, so that no statement occurs twice
    for x, y in rng.sample([(i, j) for i in range(1, 11) for j in range(1, 11)], 60):
        total = x + y
        wrong_total = total + rng.choice([-3, -2, -1, 1, 2, 3])
        out.append(("arithmetic", f"{_NUMBER_WORDS[x]} plus {_NUMBER_WORDS[y]} equals {_NUMBER_WORDS[total]}.".capitalize(),
                    f"{_NUMBER_WORDS[x]} plus {_NUMBER_WORDS[y]} equals {_NUMBER_WORDS[wrong_total]}.".capitalize()))
    for small, big in rng.sample([(i, j) for i in range(0, 21) for j in range(i + 1, 21)], 40):
        out.append(("comparison", f"{_NUMBER_WORDS[big]} is larger than {_NUMBER_WORDS[small]}.".capitalize(),
                    f"{_NUMBER_WORDS[small]} is larger than {_NUMBER_WORDS[big]}.".capitalize()))
    return out


def make_statements(n: int | None = None, *, seed: int = 0) -> list[Statement]:
    """Balanced true/false statements, shuffled. Ids are "fNNNNa" / "fNNNNb": the true and the false
    statement of fact NNNN share the prefix (`FACT_GROUP_PATTERN` groups them, so a split keeps them on
    one side: otherwise validation asks for the opposite label of a near-duplicate training sentence).

    Parameters
    ----------
    n : int, optional
        How many (rounded down to an even number); default all of them (about 560). At most the full set.
    seed : int
        Chooses the false values, the arithmetic, and the order.
    """
    pairs = _pairs(seed)
    rng = random.Random(seed + 1)
    rng.shuffle(pairs)
    if n is not None:
        if n < 2:
            raise ValueError(f"make_statements: n={n}; ask for at least 2 (one true, one false)")
        pairs = pairs[: n // 2]
    items = []
    for k, (topic, t, f) in enumerate(pairs):
        # "a"/"b" drawn at random, so an id says which fact, never which side
        a_true = rng.random() < 0.5
        items.append(Statement(id=f"f{k:04d}{'a' if a_true else 'b'}", text=t, label=1, topic=topic))
        items.append(Statement(id=f"f{k:04d}{'b' if a_true else 'a'}", text=f, label=0, topic=topic))
    rng.shuffle(items)
    return items
