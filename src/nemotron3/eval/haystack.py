"""Text for long-context tasks, made here (no download) and deterministic by seed: essay-like filler sentences,
a repeated noise passage, random values (7-digit numbers, UUIDs, adjective-noun keys, pseudo-words, variable
names), and `fit_exact`, which sizes a haystack so the rendered prompt has exactly the requested token count.

RULER (Hsieh et al. 2024) fills its haystacks with Paul Graham's essays or a repeated five-sentence passage; we
generate both kinds ourselves from templates and word lists, so no text is downloaded or copied. What the
filler says does not matter to the tasks, only that it is fluent enough not to look like a needle.

Exact token counts: a prompt is `render(n, pad)`: n whole haystack units (sentences, list items, words) plus the
first `pad` characters of the next unit(s). The largest n whose prompt fits is bracketed around an estimate from
the tokens per unit, then bisected (token count grows with n), then `pad` is bisected to hit the target exactly.
With the byte tokenizer every ASCII character is one token, so the target is always reached; a BPE tokenizer can,
rarely, skip a count at the boundary, and then the neighbouring pads are tried before giving up with a ValueError.
"""

from __future__ import annotations

import random
import string
from typing import Callable

ADJECTIVES = ["amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "idle", "jolly", "keen",
              "lucid", "mellow", "nimble", "opal", "plain", "quick", "rustic", "silent", "tidy", "upright", "vivid",
              "woolen", "young", "zealous", "bold", "crisp", "dim", "early", "fresh", "grand", "humble", "ivory",
              "jagged", "kind", "lofty", "misty", "noble", "oaken", "proud"]
NOUNS = ["anchor", "basket", "candle", "desert", "engine", "feather", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "meadow", "needle", "orchard", "pebble", "quarry", "ribbon", "saddle", "tunnel",
         "umbrella", "valley", "window", "yard", "zephyr", "bridge", "cellar", "dune", "falcon", "glacier",
         "hammer", "lantern", "marble", "nest", "oyster", "pillar", "river", "spindle", "tower", "walnut"]
_VERBS = ["shapes", "changes", "follows", "reveals", "outlasts", "explains", "rewards", "hides", "tests", "supports"]
_ADVERBS = ["slowly", "rarely", "often", "quietly", "plainly", "eventually", "usually", "seldom"]
_TOPICS = ["a small company", "an old city", "a new idea", "a good teacher", "a long project", "a careful writer",
           "a quiet village", "a young scientist", "a stubborn problem", "a useful habit"]
_ESSAY_TEMPLATES = [
    "Most people assume that {topic} {verb} the {noun} {adverb}, but the evidence points the other way.",
    "When you look closely at {topic}, the {adj} {noun} turns out to matter more than the plan.",
    "The {adj} {noun} {verb} {topic} in ways that are easy to miss at first.",
    "It is tempting to think the {noun} is the hard part; {adverb}, it is the {adj} {noun2} that decides.",
    "What {topic} needs is not another {noun} but a {adj} reason to keep going.",
    "I used to believe that a {adj} {noun} was enough, and {topic} taught me otherwise.",
    "The surprising thing about {topic} is how {adverb} the {noun} {verb} everything around it.",
    "If you want to understand {topic}, start with the {noun2} and ignore the {adj} {noun} for a while.",
    "Over time the {adj} {noun} {verb} the {noun2}, and nobody notices until it is done.",
    "A {adj} {noun} is a sign that {topic} is working, not that it is finished.",
]
# the noise haystack: one short passage, repeated (RULER's noise haystack has this shape; the words are ours)
NOISE_PASSAGE = "The lake is still. The hills are brown. The road goes on. Here we stay. Out and home again."
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def essay_sentences(rng: random.Random):
    """Endless essay-like sentences."""
    while True:
        nouns = rng.sample(NOUNS, 2)
        yield rng.choice(_ESSAY_TEMPLATES).format(
            topic=rng.choice(_TOPICS), verb=rng.choice(_VERBS), adverb=rng.choice(_ADVERBS),
            adj=rng.choice(ADJECTIVES), noun=nouns[0], noun2=nouns[1])


class Units:
    """The first n items of an endless deterministic stream, extended on demand (fit_exact asks for many n)."""

    def __init__(self, stream):
        self.stream, self.items = stream, []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(next(self.stream))
        return self.items[:n]

    def pad(self, n: int, chars: int, sep: str) -> str:
        """The first `chars` characters of sep + the units after the first n (joined by sep): fit_exact's padding."""
        k = n
        while sum(len(sep) + len(u) for u in self.take(k)[n:]) < chars:
            k += 1
        return "".join(sep + u for u in self.items[n:k])[:chars]


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID from rng (uuid.uuid4 reads the OS entropy, which would break determinism)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:]}"


def random_key(rng: random.Random) -> str:
    """An adjective-noun key, RULER's word keys ("tidy-harbor"): 1600 possibilities."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable non-word ("kazeto"): 70^3 = 343,000 of them, enough for a 1M-token word list."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables))


def coded_word(rng: random.Random, letters: int = 6) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=letters))


def variable_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


def distinct(draw: Callable[[random.Random], str], rng: random.Random, n: int, exclude=()) -> list[str]:
    """n different values of draw(rng), none in `exclude`."""
    seen, out = set(exclude), []
    while len(out) < n:
        v = draw(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def fit_exact(render: Callable[[int, int], str], count: Callable[[str], int], target: int,
              what: str) -> tuple[str, int]:
    """(text, n): render(n, pad) with exactly `target` tokens, n (whole units) as large as fits, then pad
    (characters of the next units). render(0, 0) is the prompt with an empty haystack; `what` names the task."""
    base = count(render(0, 0))
    if base > target:
        raise ValueError(f"{what}: the prompt without any haystack already has {base} tokens; ask for a length "
                         f">= {base + 1}.")
    # bracket: count(render(lo)) <= target < count(render(hi)), starting from the tokens per unit of 32 units, so
    # a 1M-token prompt costs ~15 tokenizations instead of ~40 (each one of a multi-megabyte text)
    per_unit = max((count(render(32, 0)) - base) / 32, 1e-3)
    guess = max(1, int((target - base) / per_unit))
    step = max(1, guess // 64)
    if count(render(guess, 0)) <= target:
        lo, hi = guess, guess + step
        while count(render(hi, 0)) <= target:
            lo, hi, step = hi, hi + 2 * step, 2 * step
    else:
        lo, hi = max(0, guess - step), guess
        while lo > 0 and count(render(lo, 0)) > target:
            lo, hi, step = max(0, lo - 2 * step), lo, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(render(mid, 0)) <= target else (lo, mid)
    n = lo
    # smallest pad with count >= target (a token spans at most ~8 characters of our ASCII filler)
    p_lo, p_hi = 0, 8 * (target - count(render(n, 0)))
    while p_lo < p_hi:
        mid = (p_lo + p_hi) // 2
        p_lo, p_hi = (mid + 1, p_hi) if count(render(n, mid)) < target else (p_lo, mid)
    for pad in (p_lo, p_lo - 1, p_lo + 1, p_lo + 2):
        if pad >= 0 and count(text := render(n, pad)) == target:
            return text, n
    raise ValueError(f"{what}: this tokenizer cannot render exactly {target} tokens (the haystack padding skips "
                     f"that count); ask for a length one or two tokens different.")
