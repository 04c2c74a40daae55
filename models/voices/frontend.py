"""Text frontend: English normalisation, sentence splitting, espeak-ng phonemes and audio, phoneme ids.

The same code runs at training time (espeak-ng en-us is the teacher voice: its audio and phoneme
timings make the corpus) and at serving time (user text -> phoneme ids), so both see the same tokens:

    for sentence in split_sentences(text):          # on raw text: normalize() removes "Dr." etc.
        ids = vocab.to_ids(espeak.phonemize(normalize(sentence)))

espeak-ng runs in-process through its C library (`libespeak-ng.so.1`, Debian `libespeak-ng1`, which
`espeak-ng` pulls in) with ctypes. Phonemes are its phoneme events, emitted while it synthesises.
Findings for espeak-ng 1.51, voice en-us:

* Names are espeak's ASCII mnemonics ("h", "@", "oU", "3:", "aI@", "t#"), at most 4 bytes. The
  events carry no stress, punctuation or word boundaries: stress marks ("'", ",") exist only in
  espeak_TextToPhonemes output, whose other phonemes match the events one for one.
* Pauses are tokens, kept because they take audio time: "_:" is a pause (at a comma or full stop,
  and between phrases of a long clause); each clause ends with "_", which nearly always lasts 0
  samples; "_!" and "_|" are rare. Words follow each other with no token between them.
* `phonemize` runs the same synthesis as `synthesize` and drops the audio (~1000x real time), so
  both give the same sequence by construction; espeak_TextToPhonemes is cheaper but places pauses
  differently, so it is not used.
* Determinism: phonemes depend on the text alone. Audio and starts also depend on what the process
  synthesised before (pitch-flutter phase and clause-pause state live in statics that the API
  cannot reset; durations move by ~12 ms typically, up to ~50 ms), so the same calls in the same
  order from a fresh process give identical bytes: build corpora in a fixed order per process.
  `PristineEspeak` speaks every text from the same fresh state (a helper process forks a child per
  text), so timings that serving depends on (forced phoneme durations) depend on the text alone.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from num2words import num2words

# ---- espeak-ng through ctypes --------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_DONT_EXIT = 0x8000  # return an error instead of calling exit() when espeak-ng-data is missing
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """`espeak_EVENT` from speak_lib.h."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of the message
        ("sample", ctypes.c_int),  # "internal use"; in 1.51 the same position in samples
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


# int callback(short *wav, int numsamples, espeak_EVENT *events)
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_Event))


class EspeakUnavailable(OSError):
    """libespeak-ng.so.1 (or its data) could not be loaded."""


@dataclass(frozen=True, eq=False)  # eq would compare numpy arrays
class Utterance:
    """What espeak-ng made of one text: audio and the phonemes it spoke, with their start samples."""

    audio: np.ndarray  # float32 mono in [-1, 1] at `Espeak.sample_rate`
    phonemes: list[str]
    # Sample index in `audio` where each phoneme starts, non-decreasing; a phoneme lasts until the
    # next start (the last one until the end), audio before starts[0] is leading silence.
    starts: list[int]

    def frame_durations(self, hop: int) -> np.ndarray:
        """(len(phonemes),) int16: frames of `hop` samples per phoneme, summing to len(audio) // hop.
        Each start is rounded to the nearest frame and the first phoneme takes any leading frames; a
        phoneme shorter than half a frame gets zero. The voice's training alignment and the forced
        durations at serving time (`phoneme_durations="frontend"`) both come from here."""
        frames = len(self.audio) // hop
        bounds = [min(round(s / hop), frames) for s in self.starts] + [frames]
        bounds[0] = 0
        return np.diff(np.maximum.accumulate(np.asarray(bounds))).astype(np.int16)


class _Library:
    """The process-wide espeak-ng state: it is global in the C library and not thread-safe."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libespeak-ng.so.1")
        except OSError as e:
            raise EspeakUnavailable(f"cannot load libespeak-ng.so.1 (apt-get install espeak-ng): {e}") from e
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.libc = ctypes.CDLL(None)
        self.lock = threading.Lock()
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None,
                                                 _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT)
        if self.sample_rate <= 0:
            raise EspeakUnavailable("espeak_Initialize failed (is espeak-ng-data installed?)")
        self.voice: str | None = None
        self._chunks: list[bytes] = []
        self._events: list[tuple[str, int]] = []
        self._callback = _SynthCallback(self._on_synth)  # must outlive every synthesis call
        lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav, num_samples: int, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, num_samples * 2))
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                name = event.id.string.decode("utf-8", "replace")  # .string stops at the first NUL
                # `sample` is documented as internal: trust it only while it agrees with the ms clock
                sample = event.sample
                if abs(sample * 1000 // self.sample_rate - event.audio_position) > 1:
                    sample = event.audio_position * self.sample_rate // 1000
                self._events.append((name, sample))
            i += 1
        return 0  # 0 = go on synthesising

    def set_voice(self, voice: str) -> None:
        """Select `voice` (a no-op when it is current); ValueError when espeak-ng has none such.
        Call under `lock`."""
        if voice != self.voice:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.voice = voice

    def synthesize(self, text: str, voice: str) -> tuple[bytes, list[tuple[str, int]]]:
        data = text.replace("\0", " ").encode("utf-8", "ignore") + b"\0"
        with self.lock:
            self.set_voice(voice)
            chunks, events = self._chunks, self._events = [], []
            self.libc.srand(0)  # espeak-ng draws breath noise from libc rand()
            err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            self._chunks, self._events = [], []
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err}")
        return b"".join(chunks), events


_library: _Library | None = None
_library_lock = threading.Lock()


def _get_library() -> _Library:
    global _library
    with _library_lock:
        if _library is None:
            _library = _Library()
        return _library


class Espeak:
    """espeak-ng for one voice. All instances share the single process-wide library under a lock."""

    def __init__(self, voice: str = "en-us") -> None:
        self._lib = _get_library()
        self.voice = voice
        self.sample_rate: int = self._lib.sample_rate
        self._lib.synthesize("", voice)  # fail now, not on first use, if the voice is missing

    def synthesize(self, text: str) -> Utterance:
        """Speak `text` (taken literally: run `normalize` first) and return audio and phoneme starts."""
        return _utterance(*self._lib.synthesize(text, self.voice))

    def phonemize(self, text: str) -> list[str]:
        """The phoneme names `synthesize(text)` would give (the same synthesis, audio dropped)."""
        return [p for p, _ in self._lib.synthesize(text, self.voice)[1]]


def _utterance(pcm: bytes, events: list[tuple[str, int]]) -> Utterance:
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    starts = [min(max(s, 0), len(audio)) for _, s in events]
    return Utterance(audio=audio, phonemes=[p for p, _ in events], starts=starts)


class PristineEspeak:
    """espeak-ng that speaks every text from the same fresh state, so that audio and phoneme starts
    depend on the text alone (`Espeak`'s also depend on what the process spoke before).

    A helper process (`python -m models.voices.frontend --pristine VOICE`) initialises espeak-ng, speaks
    nothing itself, and forks one child per text: the child speaks from the helper's untouched state
    and writes a JSON header line (phonemes, starts, byte count, or an error) and the 16-bit audio to
    the shared stdout. ~2x the in-process cost (a fork per text). Thread-safe; the helper starts on
    first use, is restarted if it dies, and exits when this object's pipe closes.
    """

    def __init__(self, voice: str = "en-us") -> None:
        self.voice = voice
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _helper(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            root = Path(__file__).resolve().parents[1]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
            self._proc = subprocess.Popen([sys.executable, "-m", "models.voices.frontend", "--pristine",
                                           self.voice], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=env)
        return self._proc

    def synthesize(self, text: str) -> Utterance:
        """Speak `text` (taken literally: run `normalize` first) from espeak-ng's fresh state."""
        with self._lock:
            proc = self._helper()
            try:
                proc.stdin.write(json.dumps(text).encode() + b"\n")
                proc.stdin.flush()
                header = json.loads(proc.stdout.readline() or b"null")
            except (BrokenPipeError, ValueError):
                header = None
            if header is None:  # the helper died (it restarts on the next call)
                proc.kill()
                raise RuntimeError("the espeak-ng helper process exited")
            if "error" in header:
                raise RuntimeError(f"espeak-ng: {header['error']}")
            pcm = proc.stdout.read(header["bytes"])
        return _utterance(pcm, list(zip(header["phonemes"], header["starts"])))

    def phonemize(self, text: str) -> list[str]:
        return self.synthesize(text).phonemes

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.stdin.close()
                self._proc.wait(timeout=5)
                self._proc = None


def _pristine_helper(voice: str) -> None:
    """The loop of `PristineEspeak`'s helper process: one JSON text per stdin line."""
    lib = _get_library()
    out = sys.stdout.buffer
    try:
        lib.set_voice(voice)  # selecting a voice speaks nothing: the state stays fresh
    except ValueError as e:
        out.write(json.dumps({"error": str(e)}).encode() + b"\n")
        out.flush()
        return
    for line in sys.stdin.buffer:
        pid = os.fork()
        if pid == 0:  # the child speaks from the helper's untouched state, answers, and exits
            try:
                pcm, events = lib.synthesize(json.loads(line), voice)
                header = {"phonemes": [p for p, _ in events], "starts": [s for _, s in events],
                          "bytes": len(pcm)}
                out.write(json.dumps(header).encode() + b"\n" + pcm)
            except Exception as e:  # noqa: BLE001 - reported to the caller, never raised here
                out.write(json.dumps({"error": str(e)}).encode() + b"\n")
            out.flush()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            out.write(json.dumps({"error": f"espeak-ng child failed ({status})"}).encode() + b"\n")
            out.flush()


# ---- English text normalisation -----------------------------------------------------------------

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_MONTH_BY_PREFIX = {m[:3].lower(): m for m in _MONTHS} | {"sept": "September"}
_MONTH_RE = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sept?|Oct|Nov|Dec)[a-z]*\.?"
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
               "£": ("pound", "pounds", "penny", "pence"), "¥": ("yen", "yen", "", "")}
# Abbreviation -> expansion; "." after a name in _TERMINAL may also end the sentence.
_ABBREVIATIONS = {"mr": "Mister", "mrs": "Missus", "ms": "Miz", "dr": "Doctor", "prof": "Professor",
                  "jr": "Junior", "sr": "Senior", "vs": "versus", "etc": "et cetera", "mt": "Mount",
                  "ave": "Avenue", "inc": "Incorporated", "ltd": "Limited", "co": "Company",
                  "approx": "approximately", "dept": "Department", "fig": "figure"}
_TERMINAL = {"jr", "sr", "etc", "inc", "ltd", "co", "ave", "approx", "dept"}
_CHAR_MAP = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "“": '"', "”": '"',
                           "„": '"', "‟": '"', "″": '"', "«": '"', "»": '"', "−": "-", "‐": "-",
                           "‑": "-", "⁄": "/", "×": " times ", "÷": " divided by ", "&": " and ",
                           "+": " plus ", "=": " equals ", "@": " at ", "*": " ", "_": " ",
                           "~": " ", "^": " ", "|": " ", "`": "'", "\\": " "})


def _cardinal(n: int, to: str = "cardinal") -> str:
    """US-style words for an integer, `to` "cardinal", "ordinal" or "year": no "and", no commas."""
    if n >= 10**15:  # num2words overflows eventually; nobody says such numbers anyway
        return _digits(str(n))
    return num2words(n, to=to).replace(",", "").replace(" and ", " ")


def _digits(s: str) -> str:
    return " ".join(_cardinal(int(d)) for d in s)


def _number(s: str) -> str:
    """Words for "1,234", "007", "-3.25" (decimals read digit by digit, long numbers too)."""
    sign, s = ("minus ", s[1:]) if s.startswith("-") else ("", s)
    whole, _, frac = s.replace(",", "").partition(".")
    if len(whole) > 15 or (len(whole) > 1 and whole.startswith("0")):
        words = _digits(whole)
    else:
        words = _cardinal(int(whole or "0"))
    return sign + words + (" point " + _digits(frac) if frac else "")


def _year(n: int) -> str:
    return _cardinal(n, "year")


def _ordinal(n: int) -> str:
    return _cardinal(n, "ordinal")


def _plural(words: str) -> str:
    """"nineteen ninety" -> "nineteen nineties"."""
    if words.endswith("y"):
        return words[:-1] + "ies"
    return words + ("es" if words.endswith("x") else "s")


def _money(m: re.Match) -> str:
    symbol, amount, scale = m["sym"] or m["sym2"], m["amount"] or m["amount2"], m["scale"]
    one, many, sub_one, sub_many = _CURRENCIES[symbol]
    whole, _, frac = amount.replace(",", "").partition(".")
    if scale:
        scale = {"k": "thousand", "m": "million", "mn": "million", "b": "billion", "bn": "billion"}.get(
            scale.lower(), scale.lower())
        return f" {_number(amount)} {scale} {many} "
    if len(frac) > 2 or not sub_one:
        return f" {_number(amount)} {many if amount != '1' else one} "
    cents = int(frac.ljust(2, "0")) if frac else 0
    parts = [f"{_number(whole or '0')} {one if whole == '1' else many}"]
    if cents and int(whole or 0) == 0:
        parts = []  # "$0.50": fifty cents
    if cents:
        parts.append(f"{_cardinal(cents)} {sub_one if cents == 1 else sub_many}")
    return " " + " and ".join(parts) + " "


def _time(m: re.Match) -> str:
    hour, minute, suffix = int(m["h"]), m["m"], (m["ap"] or "").lower()
    if hour > (12 if suffix else 23) or int(minute or 0) > 59:
        return m[0]
    words = _cardinal(hour)
    if minute and minute != "00":
        words += (" oh " + _cardinal(int(minute)) if minute.startswith("0") else " " + _cardinal(int(minute)))
    elif minute == "00" and not suffix:
        words += " o'clock"
    return f" {words} {suffix[0].upper() + 'M' if suffix else ''} "


def _date(m: re.Match, month: str, day: str, year: str | None = None, day_first: bool = False) -> str:
    """Month (number or name), day and year as words; the match unchanged if it is no date."""
    valid_number = month.isdigit() and 1 <= int(month) <= 12
    name = _MONTHS[int(month) - 1] if valid_number else _MONTH_BY_PREFIX.get(month.lower())
    if name is None or not 1 <= int(day) <= 31:
        return m[0]
    if day_first:
        return f" the {_ordinal(int(day))} of {name} "
    words = f"{name} {_ordinal(int(day))}"
    return f" {words}, {_year(int(year))} " if year else f" {words} "


def _fraction(m: re.Match) -> str:
    """"3/4" -> "three quarters"; other pairs ("24/7", "9/11") are read as two numbers."""
    a, b = int(m[1]), int(m[2])
    if not 0 < a < b <= 10:
        return f" {_number(m[1])} {_number(m[2])} "
    name = {2: ("half", "halves"), 4: ("quarter", "quarters")}.get(b, (_ordinal(b), _ordinal(b) + "s"))
    return f" {_cardinal(a)} {name[a != 1]} "


def _abbreviation(m: re.Match) -> str:
    word, following = m[1], m.string[m.end():]
    key = word.lower()
    if key == "st":
        return "Saint" if re.match(r"\s+[A-Z]", following) else "Street"
    if key == "no":
        return "number" if re.match(r"\s*\d", following) else m[0]
    ends_sentence = key in _TERMINAL and re.match(r"\s*$|\s+[A-Z]", following)
    return _ABBREVIATIONS[key] + ("." if ends_sentence else "")


_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_RULES: list[tuple[re.Pattern, str | Callable[[re.Match], str]]] = [
    (re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r"|st|no)\.(?=\s|$)", re.I), _abbreviation),
    (re.compile(r"\be\.g\.(?=\W|$)", re.I), "for example"),
    (re.compile(r"\bi\.e\.(?=\W|$)", re.I), "that is"),
    (re.compile(r"°\s?C\b"), " degrees Celsius "),
    (re.compile(r"°\s?F\b"), " degrees Fahrenheit "),
    (re.compile("°"), " degrees "),
    (re.compile(r"(?<=\d)\s?–\s?(?=\d)|(?<=\b\d{4})-(?=\d{4}\b)"), " to "),  # 1990–1995, 2020-2021
    (re.compile(r"\s*[–—―]\s*"), ", "),
    (re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b"), lambda m: _date(m, m[2], m[3], m[1])),  # 2024-03-15
    (re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b"), lambda m: _date(m, m[1], m[2], m[3])),  # 3/15/2024
    (re.compile(r"\b" + _MONTH_RE + r"\s+(\d{1,2})(?:st|nd|rd|th)?\b(?:,?\s+(\d{4})\b)?"),  # March 15, 2024
     lambda m: _date(m, m[1], m[2], m[3])),
    (re.compile(r"\b(?:the\s+)?(\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH_RE + r"(?=\W|$)"),  # 15 March
     lambda m: _date(m, m[2], m[1], day_first=True)),
    (re.compile(r"(?:(?<=^)|(?<=[\s(]))-(?=\d)"), " minus "),
    (re.compile(r"(?P<sym>[$€£¥])\s?(?P<amount>" + _NUM + r")(?:\s?(?P<scale>thousand|million|billion|trillion"
                r"|[kmb]n?)\b)?|(?P<amount2>" + _NUM + r")\s?(?P<sym2>[$€£¥])", re.I), _money),
    (re.compile(r"(" + _NUM + r")\s?%"), lambda m: f" {_number(m[1])} percent "),
    (re.compile(r"\b(?P<h>\d{1,2})(?::(?P<m>\d{2}))?\s?(?P<ap>[ap])\.?m\.?(?=\W|$)", re.I), _time),
    (re.compile(r"\b(?P<h>\d{1,2}):(?P<m>\d{2})\b(?P<ap>)"), _time),
    (re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.I), lambda m: f" {_ordinal(int(m[1]))} "),
    (re.compile(r"(?:\b|')(\d\d)'?s\b"), lambda m: f" {_plural(_cardinal(int(m[1])))} "),  # the '90s
    (re.compile(r"\b(1[1-9]\d\d|20\d\d)'?s\b"), lambda m: f" {_plural(_year(int(m[1])))} "),  # 1990s
    (re.compile(r"\b(1[1-9]\d\d|20\d\d)\b(?![.,]\d)"), lambda m: f" {_year(int(m[1]))} "),  # years
    (re.compile(r"\b(\d+)/(\d+)\b"), _fraction),  # 3/4, 24/7
    (re.compile(r"#\s?(?=\d)"), " number "),
    (re.compile(r"#(?=[A-Za-z])"), " hashtag "),
    (re.compile(_NUM), lambda m: f" {_number(m[0])} "),
    (re.compile(r"%"), " percent "),
    (re.compile("#"), " "),
]


def _clean(text: str) -> str:
    """NFKC, ASCII quotes, no control characters or emoji; whitespace becomes single spaces."""
    out = []
    for ch in unicodedata.normalize("NFKC", text):
        cat = unicodedata.category(ch)
        if ch.isspace():
            out.append(" ")
        elif cat[0] == "C" or (cat in ("So", "Sk") and ch != "°"):
            continue  # controls, format chars, unassigned; emoji and other pictographs
        else:
            out.append(ch)
    return "".join(out)


def normalize(text: str) -> str:
    """Rewrite English text so that espeak reads it as a person would, as a single line.

    Numbers, years, ordinals, money, percentages, times, simple dates and common abbreviations
    become words; Unicode quotes and dashes become ASCII; control characters and emoji are dropped.
    Never raises on str input.
    """
    text = _clean(text).translate(_CHAR_MAP)
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    text = re.sub(r"([!?])[!?]+", r"\1", text)
    text = re.sub(r"\s+", " ", text)
    return re.sub(r" (?=[.,!?;:)])", "", text).strip()


# ---- Sentence splitting -------------------------------------------------------------------------

_NO_SPLIT_AFTER = set(_ABBREVIATIONS) | {"st", "no", "e.g", "i.e", "a.m", "p.m", "u.s", "u.k", "jan",
                                         "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
                                         "nov", "dec"}
_BOUNDARY = re.compile(r"[.!?;]+[\"')\]]*(?=\s|$)|\n")
_PUNCTUATION_ONLY = re.compile(r"[\s.!?;:,\-'\"()\[\]]*")


def _is_abbreviation(before: str) -> bool:
    """Whether the "." that follows `before` belongs to an abbreviation or an initial."""
    words = before.split()
    word = re.sub(r"^\W+", "", words[-1]) if words else ""
    return word.lower() in _NO_SPLIT_AFTER or (len(word) == 1 and word.isupper())


def _split_long(sentence: str, max_chars: int) -> list[str]:
    pieces = []
    while len(sentence) > max_chars:
        cut = sentence.rfind(", ", max_chars // 2, max_chars) + 1 or sentence.rfind(" ", 1, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        pieces.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    return pieces + [sentence]


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Split text into sentences at . ! ? ; and newlines, none longer than `max_chars`.

    A "." after an abbreviation ("Dr.", "e.g.") or an initial ("J.") does not split, nor one inside
    a number ("3.5"). Over-long sentences are cut at the last comma, else the last space, that fits.
    Pieces with no speakable characters are dropped.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m[0] == "." and _is_abbreviation(text[start:m.start()]):
            continue
        sentences.append(text[start:m.end()])
        start = m.end()
    sentences.append(text[start:])
    out = []
    for sentence in sentences:
        sentence = " ".join(sentence.split())
        if not _PUNCTUATION_ONLY.fullmatch(sentence):
            out.extend(p for p in _split_long(sentence, max_chars) if not _PUNCTUATION_ONLY.fullmatch(p))
    return out


# ---- Phoneme ids --------------------------------------------------------------------------------

PAD = "<pad>"
# espeak-ng 1.51 en-us phoneme events seen on /usr/share/dict/words, the GPL, Apache, MPL, Artistic,
# GFDL and LGPL texts, numbers and punctuation. Append only: ids are baked into trained models.
EN_US_PHONEMES: tuple[str, ...] = (
    PAD,
    "_", "_:", "_!", "_|",
    "@", "@-", "@2", "@L", "3", "3:", "0", "a", "a#", "aa", "A:", "A@", "A~", "aI", "aI3", "aI@",
    "aU", "e", "e@", "E", "eI", "i", "i:", "i@", "i@3", "I", "I#", "I2", "o", "o@", "O", "O:", "O@",
    "O2", "O~", "OI", "oU", "u:", "U", "U@", "V",
    "b", "C", "d", "D", "dZ", "f", "g", "h", "j", "k", "l", "l#", "m", "n", "n-", "N", "p", "r",
    "r-", "s", "S", "t", "t#", "t2", "T", "tS", "v", "w", "x", "z", "Z", "?", ";",
)


class PhonemeVocab:
    """A fixed, ordered list of phoneme names and their ids (id 0 is `PAD`, never produced by espeak).

    Unknown names never raise: a name not in the list maps to its longest prefix that is
    (espeak variants such as "oU#" -> "oU", "l/2" -> "l"), else to the longest prefix of its lower
    case ("R2" -> "r"), else to the zero-length clause-end pause "_".
    """

    FALLBACK = "_"

    def __init__(self, phonemes: Sequence[str] = EN_US_PHONEMES) -> None:
        self.phonemes: tuple[str, ...] = tuple(phonemes)
        if len(set(self.phonemes)) != len(self.phonemes) or self.FALLBACK not in self.phonemes:
            raise ValueError(f"phonemes must be unique and include {self.FALLBACK!r}")
        self._ids = {p: i for i, p in enumerate(self.phonemes)}

    def __len__(self) -> int:
        return len(self.phonemes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PhonemeVocab) and self.phonemes == other.phonemes

    @property
    def pad_id(self) -> int:
        return self._ids.get(PAD, 0)

    def resolve(self, name: str) -> str:
        """The name in this vocab that `name` maps to (itself when known)."""
        for candidate in (name, name.lower()):
            for end in range(len(candidate), 0, -1):
                if candidate[:end] in self._ids:
                    return candidate[:end]
        return self.FALLBACK

    def to_ids(self, phonemes: Iterable[str]) -> list[int]:
        return [self._ids[p] if p in self._ids else self._ids[self.resolve(p)] for p in phonemes]

    def from_ids(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            if not 0 <= int(i) < len(self.phonemes):
                raise ValueError(f"phoneme id {i} out of range 0..{len(self.phonemes) - 1}")
            out.append(self.phonemes[int(i)])
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "spectts-phonemes", "version": 1,
                                          "phonemes": list(self.phonemes)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PhonemeVocab:
        data = json.loads(Path(path).read_text())
        if data.get("format") != "spectts-phonemes" or data.get("version") != 1:
            raise ValueError(f"{path}: not a version 1 SpecTTS phoneme list")
        return cls(data["phonemes"])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--pristine":
    _pristine_helper(sys.argv[2])
