"""Festival (CMU US SLT, HTS) as a long-lived worker: phones with their end times, and audio.

One `festival --pipe` process per `Festival` object, spoken to in Scheme over its stdin; stdout is
line-buffered through `stdbuf` (Festival's stdio would otherwise hold results back until it exits).
Each request builds a fresh utterance, so a text's phones and audio do not depend on earlier texts.
A request that fails or takes longer than `timeout_s` raises `FestivalError`; the process is then
killed and the next request starts a new one (~0.4 s), so one bad text never stops the others.

Phone names are Festival's radio phoneset ("pau", "hh", "ax", ...); vowels carry the stress of their
syllable (0 or 1) and a "^" when the intonation module put a pitch accent on it ("ey1^"), and the
pause that ends a question or exclamation is "pau?" / "pau!": what HTS uses for prosody, as symbols
the speech LM can read.

Two ways in:
- `phones(text)`: the front end only (text analysis, lexicon, phrasing, intonation, post-lexical
  rules) -- a few ms, what serving needs when the LM places the phone ends itself;
- `synthesize(text)`: the full HTS synthesis -- audio and the phone end times of that audio, the
  training alignment (~90 ms a sentence on one core).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

VOICE = "cmu_us_slt_arctic_hts"
DEBIAN_PACKAGES = ("festival", "festvox-us-slt-hts")
# The front-end modules of `utt.synth`, in its order, stopping before durations and waveform.
FRONT_END = ("Initialize", "Text", "Token_POS", "Token", "POS", "Phrasify", "Word", "Pauses",
             "Intonation", "PostLex")
# The phone vocabulary of voices taught by Festival (append only: ids are baked into trained models).
# "<pad>" is never produced; "_" stands for any name outside the list (PhonemeVocab's fallback).
_VOWELS = ("aa", "ae", "ah", "ao", "aw", "ax", "axr", "ay", "eh", "er", "ey", "ih", "iy", "ow", "oy",
           "uh", "uw")
_CONSONANTS = ("b", "ch", "d", "dh", "f", "g", "hh", "jh", "k", "l", "m", "n", "ng", "p", "r", "s",
               "sh", "t", "th", "v", "w", "y", "z", "zh")
FESTIVAL_PHONES: tuple[str, ...] = (
    "<pad>", "_", "pau", "pau?", "pau!", *_CONSONANTS,
    *(v + s + a for v in _VOWELS for s in ("0", "1") for a in ("", "^")))
START_TIMEOUT_S = 30.0  # loading the voice: ~0.4 s alone, more on a busy machine
_OK, _ERR = "@@SPECTTS-OK", "@@SPECTTS-ERR"
# One line per segment: name, vowel flag, syllable stress, syllable accent, end time (s), and the
# punctuation after the segment's word (for the pause that follows a question).
_PRINT_SEGMENTS = (
    '(mapcar (lambda (s) (format t "seg %s %s %s %s %s %s\\n" (item.name s) (item.feat s "ph_vc") '
    '(item.feat s "R:SylStructure.parent.stress") (item.feat s "R:SylStructure.parent.accented") '
    '(item.feat s "end") (item.feat s "p.R:SylStructure.parent.parent.R:Token.parent.punc"))) '
    "(utt.relation.items u 'Segment))")


class FestivalError(RuntimeError):
    """Festival failed on a text (or is not installed); the worker is restarted for the next one."""


@dataclass(frozen=True, eq=False)  # eq would compare numpy arrays
class FestivalUtterance:
    """Phones of one text and, after synthesis, their audio."""

    phones: list[str]
    ends: list[float]  # seconds: phone i spans [ends[i - 1], ends[i]) (the first from 0)
    audio: np.ndarray | None = None  # float32 mono in [-1, 1] at the worker's sample rate

    def frame_durations(self, hop: int, sample_rate: int) -> np.ndarray:
        """(len(phones),) int16: frames of `hop` samples per phone, summing to len(audio) // hop.
        Each end is rounded to the nearest frame; a phone shorter than half a frame gets zero."""
        if self.audio is None:
            raise ValueError("durations need the synthesised audio")
        frames = len(self.audio) // hop
        bounds = [0] + [min(round(e * sample_rate / hop), frames) for e in self.ends]
        bounds[-1] = frames
        return np.diff(np.maximum.accumulate(np.asarray(bounds))).astype(np.int16)


def available() -> bool:
    """Whether the festival binary and the SLT HTS voice are installed."""
    return shutil.which("festival") is not None and any(
        Path(d, VOICE).is_dir() for d in ("/usr/share/festival/voices/us",
                                          "/usr/share/festival/voices/english"))


def fold(text: str) -> str:
    """Text Festival reads well: accents folded to ASCII letters ("Café" -> "Cafe"), control
    characters, emoji and other pictographs dropped, whitespace collapsed."""
    out = []
    for ch in unicodedata.normalize("NFKD", text):
        cat = unicodedata.category(ch)
        if ch.isspace():
            out.append(" ")
        elif cat == "Mn" or cat[0] == "C" or (cat in ("So", "Sk") and ch != "°"):
            continue
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def scheme_string(text: str) -> str:
    """`text` as a Scheme string literal: one line, quotes and backslashes escaped."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return '"' + flat.replace("\\", "\\\\").replace('"', '\\"') + '"'


def phone_name(name: str, vowel: str, stress: str, accented: str, punc: str) -> str:
    if name == "pau":
        return "pau" + (punc[-1] if punc and punc[-1] in "?!" else "")
    if vowel == "+":
        return name + ("1" if stress not in ("0", "") else "0") + ("^" if accented == "1" else "")
    return name


class Festival:
    """A Festival process speaking `VOICE`; thread-safe (one request at a time)."""

    def __init__(self, sample_rate: int = 22050, timeout_s: float = 10.0) -> None:
        if not available():
            raise FestivalError(f"Festival with {VOICE} is not installed (Debian packages: "
                                f"{' '.join(DEBIAN_PACKAGES)})")
        self.sample_rate = sample_rate
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="spectts-festival-",
                                          dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        self.restarts = 0

    # -- public -------------------------------------------------------------------------------
    def phones(self, text: str) -> FestivalUtterance:
        """The front end's phones (their `ends` are the front end's own guesses, not HTS's)."""
        modules = " ".join(f"({m} u)" for m in FRONT_END)
        lines = self._request(f"(set! u (Utterance Text {scheme_string(text)})) {modules} "
                              f"{_PRINT_SEGMENTS}")
        return _parse(lines)

    def synthesize(self, text: str) -> FestivalUtterance:
        """HTS audio at `sample_rate` and the phones it spoke, with their end times."""
        wav = self._tmp / f"{threading.get_ident()}.wav"
        lines = self._request(
            f"(set! u (Utterance Text {scheme_string(text)})) (utt.synth u) "
            f"(utt.wave.resample u {self.sample_rate}) (utt.save.wave u \"{wav}\" 'riff) "
            f"{_PRINT_SEGMENTS}")
        utt = _parse(lines)
        if not utt.phones:
            return FestivalUtterance([], [], np.zeros(0, np.float32))
        audio, rate = sf.read(wav, dtype="float32")
        wav.unlink(missing_ok=True)
        if rate != self.sample_rate:
            raise FestivalError(f"Festival wrote {rate} Hz, not {self.sample_rate}")
        return FestivalUtterance(utt.phones, utt.ends, audio)

    def close(self) -> None:
        with self._lock:
            self._kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Festival:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass

    # -- the process ----------------------------------------------------------------------------
    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(["stdbuf", "-oL", "festival", "--pipe"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # Ctrl-C at a terminal is the server's
        self._proc = proc
        self._send(f"(voice_{VOICE})", timeout_s=max(self.timeout_s, START_TIMEOUT_S))
        return proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def _request(self, body: str) -> list[str]:
        with self._lock:
            try:
                return self._send(body)
            except FestivalError:
                self._kill()
                self.restarts += 1
                raise

    def _send(self, body: str, timeout_s: float | None = None) -> list[str]:
        proc = self._proc if self._proc is not None and self._proc.poll() is None else None
        if proc is None:
            proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f'(unwind-protect (begin {body} (format t "{_OK}\\n")) '
                             f'(format t "{_ERR}\\n"))\n'.encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise FestivalError(f"Festival died: {e}") from e
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        lines, buf, fd = [], b"", proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise FestivalError(f"Festival took longer than {timeout_s:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise FestivalError("Festival exited")
            buf += chunk
            *done, buf = buf.split(b"\n")
            for raw in done:
                line = raw.decode("utf-8", "replace")
                if line == _OK:
                    return lines
                if line == _ERR:
                    raise FestivalError("Festival could not read this text")
                lines.append(line)


def _parse(lines: list[str]) -> FestivalUtterance:
    phones, ends = [], []
    for line in lines:
        parts = line.split(" ")
        if parts[0] != "seg" or len(parts) < 6:
            continue
        name, vowel, stress, accented, end = parts[1:6]
        punc = parts[6] if len(parts) > 6 else ""
        phones.append(phone_name(name, vowel, stress, accented, punc))
        ends.append(float(end))
    return FestivalUtterance(phones, ends)
