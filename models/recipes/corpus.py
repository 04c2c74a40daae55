"""Training-text corpus for the default SpecTTS voice (taught by espeak-ng).

Mixes four sources into one deterministic, deduplicated, shuffled file (one sentence per line):

* ``fortune``  -- sentences from the Debian ``fortunes`` / ``fortunes-min`` data (offensive ``off/``
  files are never read), filtered to plain prose of 4-30 words;
* ``prose``    -- the US Constitution and Declaration of Independence shipped by ``miscfiles``;
* ``words``    -- random ``wamerican`` words in simple templates and as bare lists, for rare
  phoneme combinations;
* ``template`` -- numbers, dates, times, money, percentages, phone numbers, addresses, measurements,
  abbreviations, questions, exclamations, lists, quotes and parentheses, in raw written form (the
  text normaliser turns them into words later).

Every held-out evaluation sentence (``eval_sentences.txt``) is excluded: a corpus line is dropped if,
after lowercasing and stripping punctuation, it equals or contains an evaluation sentence.

    python -m models.recipes.corpus --out data/voice/corpus.txt
"""
from __future__ import annotations

import argparse
import gzip
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORDLIST = Path("/usr/share/dict/american-english")
PROSE_FILES = (Path("/usr/share/state/us-constitution.gz"), Path("/usr/share/state/us-declaration.gz"))
EVAL_FILE = Path(__file__).with_name("eval_sentences.txt")
# Fortune files that are code, pictures or not English.
SKIP_FORTUNE_FILES = {"ascii-art", "translate-me", "perl"}
# Most of the target each source may take; "template" lines fill the remainder.
SHARE = {"fortune": 0.50, "prose": 0.02, "words": 0.22}
MAX_CHARS = 300

# Cleaning and filtering real text
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[\"'(]?[A-Z])")
_ABBREV_END = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|Mt|No|Inc|Co|[A-Z])\.$")
_CODE = re.compile(r"[{}<>\[\]|\\_=#@~^`*/+]|https?:|www\.|\.(?:com|org|net|edu)\b|::|;\s*$")
_SPEAKER = re.compile(r"^(?:[A-Z][A-Za-z]{0,15}|Q|A):\s+")
# Accents written as ASCII in the fortune files ("Caf'e", "m\"ude"); contractions are fine.
_ASCII_ACCENT = re.compile(r"[A-Za-z]'(?!(?:t|s|re|ve|ll|d|m|clock)\b)[a-z]|\w\"\w")


def _norm(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, collapse whitespace."""
    text = re.sub(r"['\u2019]", "", text.lower())
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def _letter_ratio(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(1, len(chars))


def _good_sentence(s: str, min_words: int = 4, max_words: int = 30) -> bool:
    """True for a plain ASCII prose sentence of a speakable length."""
    if (not s.isascii() or len(s) > MAX_CHARS or _CODE.search(s) or _ASCII_ACCENT.search(s)
            or _letter_ratio(s) < 0.8
            or not min_words <= len(s.split()) <= max_words
            or not re.match(r"[\"'(]?[A-Z]", s) or not re.search(r"[.!?][\"')]?$", s)):
        return False
    letters = [c for c in s if c.isalpha()]
    if sum(c.isupper() for c in letters) > 0.5 * len(letters):  # shouting or acronym soup
        return False
    return s.count("(") == s.count(")") and s.count('"') % 2 == 0


def split_sentences(paragraph: str) -> list[str]:
    """Split prose into sentences on ``.!?`` followed by a capital, not after an abbreviation."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        if out and _ABBREV_END.search(out[-1]):
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return [p.strip() for p in out if p.strip()]


def _english(s: str, vocab: set[str], threshold: float = 0.85) -> bool:
    """True if most lowercase words of ``s`` are dictionary words (always true without a dictionary)."""
    tokens = [t for t in (t.strip("'") for t in re.findall(r"[A-Za-z']+", s)) if t and t[0].islower()]
    return not vocab or sum(t in vocab for t in tokens) >= threshold * len(tokens)


def _clean_paragraph(text: str) -> str:
    text = re.sub(r"([a-z])- (?=[a-z])", r"\1", text)  # words hyphenated across a line break
    text = re.sub(r"\*(\w[\w' ]*)\*|\b_(\w+)_\b", lambda m: m[1] or m[2], text)  # *emphasis*
    text = text.replace("``", '"').replace("''", '"').replace("--", ", ")
    text = re.sub(r"\s+,", ",", text)
    return " ".join(text.split())


def _fortune_sentences(path: Path) -> Iterator[str]:
    """Sentences of one fortune file: attributions and picture lines removed, paragraphs joined."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    for fortune in re.split(r"^%\s*$", raw, flags=re.M):
        paragraphs, current = [], []
        for line in fortune.splitlines():
            stripped = line.strip()
            if re.match(r"^(?:--|-\s|~~)", stripped) or (line.startswith("\t\t") and "--" in line):
                break  # attribution: the rest of the fortune is the source
            if not stripped or _letter_ratio(stripped) < 0.6:
                if current:
                    paragraphs.append(" ".join(current))
                current = []
                continue
            current.append(_SPEAKER.sub("", stripped))
        if current:
            paragraphs.append(" ".join(current))
        for para in paragraphs:
            yield from split_sentences(_clean_paragraph(para))


def fortune_sentences(directory: Path = FORTUNE_DIR) -> list[str]:
    """All usable English fortune sentences (empty if the fortunes packages are not installed)."""
    if not directory.is_dir():
        return []
    files = sorted(p for p in directory.iterdir()  # top level only: off/ is never read
                   if p.is_file() and not p.suffix and p.name not in SKIP_FORTUNE_FILES)
    vocab = {w.lower() for w in _dictionary()}
    return [s for p in files for s in _fortune_sentences(p) if _good_sentence(s) and _english(s, vocab)]


def prose_sentences(files: tuple[Path, ...] = PROSE_FILES) -> list[str]:
    """Sentences from the public-domain documents shipped by ``miscfiles`` (if installed)."""
    out = []
    for path in files:
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                paragraphs = re.split(r"\n\s*\n", f.read())
            out += [s for para in paragraphs for s in split_sentences(_clean_paragraph(para))
                    if _good_sentence(s)]
    return out


def _dictionary(path: Path = WORDLIST) -> list[str]:
    """Every entry of the ``wamerican`` word list (empty if it is not installed)."""
    return path.read_text(encoding="utf-8", errors="replace").split() if path.is_file() else []


def load_words(path: Path = WORDLIST) -> list[str]:
    """Lowercase alphabetic words of 3-12 letters (no proper nouns, no possessives), sorted."""
    return sorted({w for w in _dictionary(path) if re.fullmatch(r"[a-z]{3,12}", w)})


def load_eval_sentences(path: Path = EVAL_FILE) -> list[str]:
    """The held-out evaluation sentences, one per line; never part of the training corpus."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# Generated sentences
NAMES = "Anna Ben Carlos Diana Emma Frank Grace Henry Irene Jack Karen Leo Maria Nina Oscar Paul " \
        "Rachel Sam Tom Vera Will Zoe Alice David Helen Kevin Laura Mike Olivia Peter Sarah".split()
SURNAMES = "Smith Johnson Brown Miller Davis Wilson Moore Taylor Clark Lewis Walker Hall Young " \
           "King Wright Green Baker Adams Nelson Carter Hughes Price Bennett Ward Foster".split()
TITLES = ["Dr.", "Mr.", "Mrs.", "Ms.", "Prof."]
STREETS = "Oak Maple Pine Cedar Elm Main Park Lake Hill River Church Market Mill Bridge Spring " \
          "Washington Lincoln Sunset Highland Forest".split()
STREET_TYPES = ["St.", "Ave.", "Rd.", "Street", "Avenue", "Road", "Lane", "Drive", "Boulevard"]
PLACES = ["the library", "the station", "the airport", "the office", "the market", "the clinic",
          "the school", "the gym", "the harbor", "the museum", "the bakery", "the post office",
          "the hotel", "the stadium", "the garage", "the pharmacy", "the theater", "the bank"]
ITEMS = ["a coffee", "a sandwich", "the tickets", "a new lamp", "two shirts", "a bicycle",
         "the groceries", "a laptop", "the repairs", "a haircut", "the taxi", "lunch", "a jacket",
         "a pair of boots", "the parking", "a watch", "the dinner", "a train pass", "the flowers"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
UNITS = {"length": ["miles", "kilometers", "meters", "feet", "inches", "yards", "km", "cm", "mm", "ft"],
         "weight": ["pounds", "kilograms", "grams", "ounces", "tons", "kg", "lbs", "oz", "g"],
         "volume": ["liters", "gallons", "cups", "milliliters", "ml", "quarts", "tablespoons"]}
THINGS = ["the bridge", "the tower", "the river", "the road", "the tank", "the box", "the wall",
          "the trail", "the cable", "the package", "the lake", "the table", "the fence", "the pipe"]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _number(r: random.Random) -> str:
    forms = [str(r.randint(0, 99)), str(r.randint(100, 999)), f"{r.randint(1000, 999999):,}",
             f"{r.uniform(0, 100):.{r.choice([1, 2])}f}"]
    return r.choices(forms, weights=[4, 3, 2, 1])[0]


def _money(r: random.Random) -> str:
    sym = r.choice(["$", "$", "$", "€", "£"])
    forms = [f"{sym}{r.randint(1, 99)}.{r.randint(0, 99):02d}", f"{sym}{r.randint(1, 500)}",
             f"{sym}{r.randint(1000, 99999):,}",
             f"{sym}{r.randint(1, 30)} {r.choice(['million', 'billion'])}",
             f"{r.randint(1, 99)} cents"]
    return r.choices(forms, weights=[8, 6, 3, 2, 1])[0]


def _time(r: random.Random) -> str:
    h, m = r.randint(1, 12), r.choice([0, 5, 10, 15, 20, 30, 40, 45, 50, r.randint(0, 59)])
    forms = [f"{h}:{m:02d} {r.choice(['am', 'pm', 'a.m.', 'p.m.'])}", f"{r.randint(0, 23)}:{m:02d}",
             f"{h} {r.choice(['am', 'pm'])}", f"{h}:{m:02d}"]
    return r.choices(forms, weights=[8, 6, 3, 3])[0]


def _date(r: random.Random) -> str:
    month, day, year = r.choice(MONTHS), r.randint(1, 28), r.randint(1850, 2035)
    forms = [f"{month} {day}", f"{month} {_ordinal(day)}", f"{month} {day}, {year}",
             f"{month} {_ordinal(day)}, {year}", f"{_ordinal(day)} of {month}",
             f"{r.randint(1, 12)}/{day}/{year}", f"{month} {year}", f"{r.choice(DAYS)}, {month} {day}"]
    return r.choice(forms)


def _phone(r: random.Random) -> str:
    a, b, c = r.randint(200, 989), r.randint(200, 999), r.randint(0, 9999)
    return r.choice([f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"{b}-{c:04d}", f"1-800-{b}-{c:04d}"])


def _address(r: random.Random) -> str:
    return f"{r.randint(1, 9999)} {r.choice(STREETS)} {r.choice(STREET_TYPES)}"


def _person(r: random.Random) -> str:
    name, surname = r.choice(NAMES), r.choice(SURNAMES)
    return r.choices([name, f"{r.choice(TITLES)} {surname}", f"{name} {surname}"], weights=[2, 2, 1])[0]


def _measure(r: random.Random, kind: str) -> str:
    """A quantity of ``kind`` ("length", "weight", "volume" or "temperature")."""
    if kind == "temperature":
        return r.choice([f"{r.randint(-20, 105)} degrees", f"{r.randint(-10, 40)}°C",
                         f"{r.randint(0, 100)}°F"])
    return f"{r.choice([str(r.randint(2, 500)), f'{r.uniform(0.1, 99):.1f}'])} {r.choice(UNITS[kind])}"


_FILL: dict[str, Callable[[random.Random], str]] = {
    "person": _person, "money": _money, "time": _time, "date": _date, "phone": _phone,
    "address": _address, "num": _number, "item": lambda r: r.choice(ITEMS),
    "place": lambda r: r.choice(PLACES), "day": lambda r: r.choice(DAYS),
    "month": lambda r: r.choice(MONTHS), "surname": lambda r: r.choice(SURNAMES),
    "street": lambda r: f"{r.choice(STREETS)} {r.choice(STREET_TYPES)}",
    "Thing": lambda r: r.choice(THINGS).capitalize(), "year": lambda r: str(r.randint(1700, 2035)),
    "small": lambda r: str(r.randint(0, 12)), "int": lambda r: str(r.randint(13, 999)),
    "pct": lambda r: f"{r.randint(1, 100)}%" if r.random() < 0.7 else f"{r.uniform(0, 60):.1f}%",
    "ord": lambda r: _ordinal(r.randint(1, 120)), "pin": lambda r: str(r.randint(1000, 999999)),
    "length": lambda r: _measure(r, "length"), "weight": lambda r: _measure(r, "weight"),
    "volume": lambda r: _measure(r, "volume"), "temp": lambda r: _measure(r, "temperature"),
    "code": lambda r: "".join(r.choice("ABCDLU") for _ in range(2)) + f" {r.randint(10, 9999)}",
    "per": lambda r: r.choice(["hour", "day", "week", "month", "person", "kilogram"]),
}
_TEMPLATES = [
    "{person} paid {money} for {item} at {place}.", "The total comes to {money}, including tax.",
    "Tickets cost {money} for adults and {money} for children.", "Is it true that {item} now costs {money}?",
    "The meeting with {person} starts at {time} on {day}.", "The store opens at {time} and closes at {time}.",
    "Please be at {place} by {time}, or we will leave without you!", "What time is it? It is already {time}.",
    "{person} was born on {date}.", "The deadline was moved from {date} to {date}.",
    "On {date}, {person} opened a small shop on {street}.", "In {year}, the town had about {num} people.",
    "Sales rose by {pct} in {year}, and profits grew {pct}.", "Only {pct} of the {num} voters answered.",
    "Call {person} at {phone} if you have any questions.", "Our new number is {phone}; the old one is gone.",
    "Send the letter to {person}, {address}, apartment {int}.", "The office moved to {address} last {month}.",
    "She finished in {ord} place out of {int} runners.", "This is the {ord} time I have asked you!",
    "Take the elevator to the {ord} floor and turn right.", "{Thing} is {length} long and {length} wide.",
    "We walked {length} before lunch, then another {length} after.", "It dropped to {temp} overnight.",
    "Add {volume} of water and {small} eggs, then stir for {int} seconds.", "It ended {small} to {small}.",
    "Room {int} is booked from {date} until {date}.", "Flight {code} departs from gate {int} at {time}.",
    '{person} said, "I will be there at {time}, I promise."', '"How much is {item}?" asked {person}.',
    "The report (about {int} pages long) is due on {date}.", "Bring {item}, {item}, {item}, and {item}.",
    "{person} lives at {address}, near {place}.", "Wow, {num} people showed up at {place}!",
    "Did {person} really spend {money} on {item}?", "The package weighs {weight} and costs {money} to ship.",
    "Between {year} and {year}, prices went up {pct}.", "Chapter {int} starts on page {int}.",
    "Dr. {surname} and Mrs. {surname} met on {street} at {time}.", "The fee is {pct}, not {pct}.",
    "Please read numbers {small} through {int} aloud.", "My PIN is not {pin}, and my code is not {pin}.",
    "It costs {money} per {per}, doesn't it?", "The forecast says {temp} on {day}, {pct} chance of rain.",
    "Mix {weight} of flour with {volume} of milk (or water).", "Was it {year} or {year}? I forget.",
]


def template_sentence(r: random.Random) -> str:
    """One sentence with numbers, money, times, dates, abbreviations or punctuation."""
    s = re.sub(r"\{(\w+)\}", lambda m: _FILL[m[1]](r), r.choice(_TEMPLATES))
    return s.replace("m..", "m.")  # "at 7 p.m.." -> "at 7 p.m."


_ADJ = re.compile(r"(?:ous|ful|ive|able|ible|al|ic|less|ish|ent|ant|ary)$")
_NOUN = re.compile(r"(?:ness|ment|tion|sion|ity|ism|ist|ship|hood|ance|ence|dom|ure)$")
_ING, _PAST = re.compile(r"ing$"), re.compile(r"[^e]ed$")
_WORD_FRAMES = [
    "The word {w} is hard to say.", "Please spell the word {w} for me.", "Say {w} again, slowly.",
    "Is {w} a real word?", "She wrote {w}, {w2}, and {w3} on the board.",
    "{W}, {w2}, {w3}, and so on.", "Next on the list: {w}, then {w2}.", "He whispered {w} and then {w2}!",
    "The answer was either {w} or {w2}.", "I looked up {w} in the dictionary.",
]


def word_sentence(r: random.Random, words: list[str]) -> str:
    """A sentence built from random dictionary words: a template, a frame or a bare list."""
    def pick(pattern: re.Pattern[str]) -> str:  # a random word whose suffix suggests its part of speech
        return next((w for w in (r.choice(words) for _ in range(200)) if pattern.search(w)), r.choice(words))

    kind = r.random()
    if kind < 0.35:
        return r.choice([
            f"The {pick(_ADJ)} {pick(_NOUN)} surprised everyone.",
            f"Nobody expected such {pick(_NOUN)} from a {pick(_ADJ)} neighbor.",
            f"Is the {pick(_NOUN)} really that {pick(_ADJ)}?",
            f"They spoke about {pick(_NOUN)} and {pick(_NOUN)} all evening.",
            f"A {pick(_ADJ)} idea is better than a {pick(_ADJ)} excuse.",
            f"Her {pick(_NOUN)} seemed {pick(_ADJ)} but {pick(_ADJ)}.",
            f"We were {r.choice(['slowly', 'quietly', 'suddenly'])} {pick(_ING)} near the {pick(_NOUN)}.",
            f"The committee {pick(_PAST)} the {pick(_NOUN)} without a word.",
        ])
    if kind < 0.65:
        w = [r.choice(words) for _ in range(3)]
        return r.choice(_WORD_FRAMES).format(w=w[0], W=w[0].capitalize(), w2=w[1], w3=w[2])
    n = r.randint(4, 12)
    items = [r.choice(words) for _ in range(n)]
    text = " ".join(items) if r.random() < 0.5 else ", ".join(items)
    return text[0].upper() + text[1:] + r.choice([".", ".", "?", "!"])


# Assembly
class _EvalFilter:
    """Rejects lines that equal or contain (on word boundaries) a normalised evaluation sentence."""

    def __init__(self, sentences: list[str]) -> None:
        self.keys = [f" {_norm(s)} " for s in sentences if _norm(s)]

    def __call__(self, line: str) -> bool:
        padded = f" {_norm(line)} "
        return not any(k in padded for k in self.keys)


def build_corpus(out_path: Path, target_sentences: int = 40000, seed: int = 0) -> int:
    """Write a shuffled, deduplicated corpus of about ``target_sentences`` lines; return its size.

    Also writes ``<out>.sources`` next to it: the source name of each corpus line, line by line.
    """
    r = random.Random(seed)
    allowed = _EvalFilter(load_eval_sentences())
    seen: set[str] = set()
    chosen: list[tuple[str, str]] = []

    def take(source: str, candidates: Iterator[str] | list[str], quota: int, max_tries: int) -> None:
        got = 0
        for tries, s in enumerate(candidates):
            if got >= quota or tries >= max_tries:
                break
            s = " ".join(s.split())
            key = _norm(s)
            if s and len(s) <= MAX_CHARS and key and key not in seen and allowed(s):
                seen.add(key)
                chosen.append((source, s))
                got += 1

    for source, pool in (("fortune", fortune_sentences()), ("prose", prose_sentences())):
        r.shuffle(pool)
        take(source, pool, int(SHARE[source] * target_sentences), len(pool))
    words = load_words()
    if words:
        take("words", (word_sentence(r, words) for _ in iter(int, 1)),
             int(SHARE["words"] * target_sentences), 20 * target_sentences)
    take("template", (template_sentence(r) for _ in iter(int, 1)), target_sentences - len(chosen),
         50 * target_sentences)
    if len(chosen) < target_sentences and words:  # templates saturated: top up with word lines
        take("words", (word_sentence(r, words) for _ in iter(int, 1)),
             target_sentences - len(chosen), 20 * target_sentences)

    r.shuffle(chosen)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(f"{s}\n" for _, s in chosen), encoding="utf-8")
    out_path.with_suffix(out_path.suffix + ".sources").write_text(
        "".join(f"{src}\n" for src, _ in chosen), encoding="utf-8")
    return len(chosen)


def source_counts(out_path: Path) -> Counter[str]:
    """Lines per source of a corpus written by :func:`build_corpus`."""
    sources = Path(out_path).with_suffix(Path(out_path).suffix + ".sources")
    return Counter(sources.read_text(encoding="utf-8").split())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the voice training text corpus.")
    parser.add_argument("--out", type=Path, default=Path("data/voice/corpus.txt"))
    parser.add_argument("--sentences", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = build_corpus(args.out, args.sentences, args.seed)
    lines = args.out.read_text(encoding="utf-8").splitlines()
    n_words = sum(len(line.split()) for line in lines)
    hours = n_words / 2.6 / 3600
    print(f"wrote {n} sentences, {n_words} words (~{hours:.1f} h at 2.6 words/s) to {args.out}")
    for source, count in sorted(source_counts(args.out).items()):
        print(f"  {source:9s} {count}")


if __name__ == "__main__":
    main()
