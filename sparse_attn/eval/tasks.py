"""Long-context tasks generated from a seed with the model's own tokenizer (RULER-style, Hsieh et
al. 2024): nothing is downloaded, and a context length means that many of the model's tokens.

Tasks (TASKS):
  niah_single        one needle "the special magic number for KEY is VALUE" in a haystack;
                     answer VALUE.
  niah_multikey      four needles with different keys; asked about one of them.
  niah_multivalue    four needles with the same key and different values; every value is asked
                     for (score: the fraction recalled).
  variable_tracking  a chain of five assignments "VAR X2 = VAR X1" from one value, scattered in
                     the haystack; every variable holding the value is asked for (fraction).
  common_words       a list of words, ten of which are far more frequent; the ten are asked for
                     (fraction).
  visual_needle      VLMs only: a grid image with one cell holding the only shape of its kind,
                     placed in a text haystack; the question asks its colour.

A task is scored by word containment (docs/eval.md#scoring): the fraction of the expected answer
words that appear in the completion, case and punctuation ignored.

Tokenizers of tiny test models know a few hundred words. The Lexicon works out which words and
phrases the tokenizer encodes and decodes back unchanged; every template has fallbacks down to a
bare form ("KEY VALUE", "what is KEY"), the first one the tokenizer encodes is used, and the
haystack, keys and values come from words it encodes (docs/eval.md#tokenizers).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

# Everyday English words for haystacks and keys on real tokenizers (any byte-level BPE or
# sentencepiece vocabulary encodes them).
ENGLISH = """
apple river mountain window garden candle letter market silver forest ocean pencil bridge
castle doctor engine farmer guitar hammer island jacket kettle ladder mirror needle orange
pepper rabbit saddle tunnel violin wagon yellow zebra anchor basket cactus dragon eagle falcon
glacier harbor igloo jungle kitten lemon magnet napkin oyster parrot quartz rocket spider tiger
umbrella valley walnut button canyon desert ember feather goblet helmet insect jasmine koala
lantern meadow nectar orchid pillow quiver ribbon saffron tulip velvet willow almond barrel
cherry dolphin elbow fossil ginger hazel ivory jigsaw kernel lobster marble nutmeg olive
panther quill raven salmon thistle urchin vessel whistle yogurt amber blossom copper denim
emerald flannel granite hornet indigo juniper kayak lilac mango nickel onyx pebble quinoa
rhubarb sparrow turnip vapor wheat cobalt maple cotton meteor puzzle sunset harvest compass
crystal blanket carpet cloud comet coral daisy fabric galaxy hollow icicle lagoon lotus mosaic
nebula opal pirate prism radar sapphire scarlet shadow summit thunder topaz trumpet velcro
voyage wizard breeze cedar dune fern grove heron iris ledge moss nest oak pine quay reed shell
""".split()
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
    "orange": (240, 140, 30),
}
SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "cross")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> list[str]:
    """Lower-cased words, punctuation removed: "Red." -> ["red"]."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def score(completion: str, answers: tuple[str, ...]) -> float:
    """Fraction of the answer words found among the completion's words (docs/eval.md#scoring)."""
    words = set(normalise(completion))
    return sum(all(w in words for w in normalise(a)) for a in answers) / len(answers)


class Lexicon:
    """What the tokenizer can say: phrases it encodes without unknown tokens and decodes back
    to the same words, and disjoint word pools for keys, values and haystack filler."""

    MIN_POOL = 5  # variable_tracking needs five distinct names

    def __init__(self, tokenizer, reserved: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self._reserved = {w.lower() for r in reserved for w in normalise(r)}
        self._known: dict[str, bool] = {}

    def encodes(self, text: str) -> bool:
        if text not in self._known:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            unk = self.tokenizer.unk_token_id
            decoded = self.tokenizer.decode(ids)
            self._known[text] = (unk is None or unk not in ids) and decoded.split() == text.split()
        return self._known[text]

    def first(self, *templates: str, **values) -> str:
        """The first template (filled with ``values``) the tokenizer encodes exactly."""
        for template in templates:
            text = template.format(**values)
            if self.encodes(text):
                return text
        raise ValueError(f"the tokenizer encodes none of {[t.format(**values) for t in templates]}")

    @cached_property
    def numbers(self) -> bool:
        """Whether seven-digit numbers survive the tokenizer (RULER's values)."""
        return all(self.encodes(n) for n in ("1234567", "9081726", "5550123"))

    @cached_property
    def words(self) -> list[str]:
        """Words the tokenizer encodes, in a fixed order: the English list, or for a tokenizer
        that knows too few of them (a tiny test model) its own alphanumeric vocabulary."""
        words = [w for w in ENGLISH if w not in self._reserved and self.encodes(w)]
        if len(words) < 3 * 16:
            special = set(getattr(self.tokenizer, "all_special_tokens", []))
            vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda item: item[1])[:20000]
            seen = set(words)
            for token, _ in vocab:
                text = self.tokenizer.convert_tokens_to_string([token]).strip()
                if (
                    token not in special
                    and text.isalnum()
                    and text.lower() not in self._reserved
                    and text not in seen
                    and self.encodes(text)
                ):
                    words.append(text)
                    seen.add(text)
        return words

    @cached_property
    def pools(self) -> dict[str, list[str]]:
        """Disjoint pools: keys, values (seven-digit numbers when they encode: empty here) and
        filler, split from ``words`` by position."""
        words = self.words
        if self.numbers:
            pools = {"keys": words[0::2], "values": [], "filler": words[1::2]}
        else:
            pools = {"keys": words[0::3], "values": words[1::3], "filler": words[2::3]}
        short = [
            name
            for name, pool in pools.items()
            if len(pool) < self.MIN_POOL and not (name == "values" and self.numbers)
        ]
        if short:
            raise ValueError(
                f"the tokenizer encodes too few distinct words for the tasks "
                f"({len(words)} found; pools {short} need {self.MIN_POOL} each)"
            )
        return pools

    def values(self, rng: np.random.Generator, count: int) -> list[str]:
        """``count`` distinct values: seven-digit numbers, or words of the values pool."""
        if self.numbers:
            return [str(v) for v in rng.choice(9_000_000, size=count, replace=False) + 1_000_000]
        return pick(rng, self.pools["values"], count)

    def keys(self, rng: np.random.Generator, count: int) -> list[str]:
        return pick(rng, self.pools["keys"], count)


def pick(rng: np.random.Generator, pool: list[str], count: int) -> list[str]:
    """``count`` distinct items of ``pool`` (with repeats only if the pool is smaller)."""
    replace = count > len(pool)
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=replace)]


@dataclass
class Sample:
    """One prompt: ``body(n)`` is its text at haystack size n (longer as n grows), with
    ``IMAGE`` marking where the image goes; ``answers`` the words a completion must contain."""

    task: str
    index: int
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    body: object  # callable n -> str
    image: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


IMAGE = (
    "\x00IMAGE\x00"  # the image's place in a body; the model encoder substitutes the placeholders
)


class Filler:
    """A deterministic stream of haystack sentences: sentence i is the same for every n."""

    def __init__(self, lexicon: Lexicon, rng: np.random.Generator, words: list[str] | None = None):
        self.words = words or lexicon.pools["filler"]
        self.rng = rng
        self.stop = " ." if lexicon.encodes(f"{self.words[0]} .") else ""
        self.sentences: list[str] = []

    def __getitem__(self, count: int) -> list[str]:
        while len(self.sentences) < count:
            n = int(self.rng.integers(6, 11))
            self.sentences.append(" ".join(pick(self.rng, self.words, n)) + self.stop)
        return self.sentences[:count]


def with_inserts(filler: Filler, n: int, inserts: list[tuple[float, str]]) -> str:
    """n filler sentences with each (depth in [0, 1], text) inserted at that depth."""
    sentences = list(filler[n])
    for depth, text in sorted(inserts, key=lambda item: item[0], reverse=True):
        sentences.insert(round(depth * n), text)
    return " ".join(sentences)


NEEDLE = ("One of the special magic numbers for {key} is: {value}.", "{key} {value}")
QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text?",
    "what is {key} ?",
    "what is {key}",
)
ANSWER_PREFIX = ("The special magic number for {key} mentioned in the provided text is", "")
# Words of the templates; kept out of the word pools so a key never reads like an instruction.
TEMPLATE_WORDS = (
    *NEEDLE,
    *QUESTION,
    *ANSWER_PREFIX,
    "VAR what is answer the a colour shape",
    *COLOUR_RGB,
    *SHAPE_NAMES,
)


def _niah(
    name: str, lexicon: Lexicon, rng: np.random.Generator, index: int, keys: int, values: int
) -> Sample:
    names = lexicon.keys(rng, keys)
    vals = lexicon.values(rng, keys * values)
    needles = [(names[k], vals[k * values + v]) for k in range(keys) for v in range(values)]
    asked = names[int(rng.integers(keys))]
    answers = tuple(v for k, v in needles if k == asked)
    depths = rng.random(len(needles)).tolist()
    inserts = [(d, lexicon.first(*NEEDLE, key=k, value=v)) for d, (k, v) in zip(depths, needles)]
    filler = Filler(lexicon, rng)
    question = lexicon.first(*QUESTION, key=asked)
    if values > 1:
        question = lexicon.first(
            "What are all the special magic numbers for {key} mentioned in the provided text?",
            question,
            key=asked,
        )
    prefix = lexicon.first(*ANSWER_PREFIX, key=asked)
    if values > 1:
        prefix = lexicon.first(
            "The special magic numbers for {key} mentioned in the provided text are",
            prefix,
            key=asked,
        )
    return Sample(
        name,
        index,
        question,
        prefix,
        answers,
        lambda n: with_inserts(filler, n, inserts),
        meta={"depths": depths},
    )


def niah_single(lexicon, rng, index):
    return _niah("niah_single", lexicon, rng, index, keys=1, values=1)


def niah_multikey(lexicon, rng, index):
    return _niah("niah_multikey", lexicon, rng, index, keys=4, values=1)


def niah_multivalue(lexicon, rng, index):
    return _niah("niah_multivalue", lexicon, rng, index, keys=1, values=4)


def variable_tracking(lexicon, rng, index, hops: int = 5) -> Sample:
    letters = [chr(ord("A") + i) for i in range(26)]
    upper = ["".join(rng.choice(letters, size=5)) for _ in range(hops)]
    names = (
        upper if all(lexicon.encodes(f"VAR {u} = 1 .") for u in upper) else lexicon.keys(rng, hops)
    )
    (value,) = lexicon.values(rng, 1)
    sources = [value, *names[:-1]]
    depths = sorted(rng.random(hops).tolist())  # assignments in chain order
    inserts = []
    for depth, name, source in zip(depths, names, sources):
        rhs = source if source == value else f"VAR {source}"
        inserts.append(
            (depth, lexicon.first("VAR {a} = {b} .", "{a} {c}", a=name, b=rhs, c=source))
        )
    filler = Filler(lexicon, rng)
    question = lexicon.first(
        "Find all variables that are assigned the value {value} in the text above.",
        "what is {value}",
        value=value,
    )
    prefix = lexicon.first(
        "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
        "assigned the value {value}, they are:",
        "",
        n=hops,
        value=value,
    )
    return Sample(
        "variable_tracking",
        index,
        question,
        prefix,
        tuple(names),
        lambda n: with_inserts(filler, n, inserts),
    )


def common_words(lexicon, rng, index, top: int = 10) -> Sample:
    pool = lexicon.pools["keys"] + lexicon.pools["filler"]
    top = min(top, max(1, len(pool) // 4))
    chosen = pick(rng, pool, len(pool))  # a permutation: the first ``top`` are the common ones
    common, rare = chosen[:top], chosen[top:]
    seed = int(rng.integers(2**31))
    numbered = lexicon.encodes("1. " + common[0] + " 2. " + common[0])

    def body(n: int) -> str:
        # n rare occurrences; each common word appears more than twice as often as any rare one.
        per_rare = -(-n // len(rare)) if n else 0
        items = [w for w in common for _ in range(2 * per_rare + 2)]
        items += [rare[i % len(rare)] for i in range(n)]
        order = np.random.default_rng([seed, n]).permutation(len(items))
        words = [items[i] for i in order]
        return " ".join(f"{i + 1}. {w}" if numbered else w for i, w in enumerate(words))

    question = lexicon.first(
        "What are the {top} most common words in the above list?", "what is", "", top=top
    )
    prefix = lexicon.first(
        "Answer: The top {top} words that appear most often in the list are:", "", top=top
    )
    return Sample("common_words", index, question, prefix, tuple(common), body)


def shape_mask(shape: str, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "circle":
        return (y - c) ** 2 + (x - c) ** 2 <= c * c
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":
        return np.abs(x - c) <= y / 2
    if shape == "diamond":
        return np.abs(x - c) + np.abs(y - c) <= c
    arm = size / 6  # cross
    return (np.abs(x - c) <= arm) | (np.abs(y - c) <= arm)


def visual_needle(lexicon, rng, index, image_size: int = 448, grid: int = 8) -> Sample:
    colours = [c for c in COLOUR_RGB if lexicon.encodes(c)]
    shapes = [s for s in SHAPE_NAMES if lexicon.encodes(s)]
    if len(colours) < 2 or len(shapes) < 2:
        raise ValueError(
            "visual_needle: the tokenizer does not encode enough colour and shape words"
        )
    target = shapes[int(rng.integers(len(shapes)))]
    others = [s for s in SHAPE_NAMES if s != target]
    colour = colours[int(rng.integers(len(colours)))]
    # A few objects, as in the tiny VLM's own world (sf_train.task: 6-10 objects).
    cells = rng.choice(grid * grid, size=min(grid * grid, int(rng.integers(6, 11))), replace=False)
    cell = image_size // grid
    size = int(cell * 0.75)
    offset = (cell - size) // 2
    image = np.full((image_size, image_size, 3), 40, dtype=np.uint8)
    for i, c in enumerate(cells):
        shape = target if i == 0 else others[int(rng.integers(len(others)))]
        rgb = (
            COLOUR_RGB[colour]
            if i == 0
            else COLOUR_RGB[list(COLOUR_RGB)[int(rng.integers(len(COLOUR_RGB)))]]
        )
        top, left = int(c) // grid * cell + offset, int(c) % grid * cell + offset
        image[top : top + size, left : left + size][shape_mask(shape, size)] = rgb
    depth = float(rng.random())
    pool = [w for w in lexicon.pools["filler"] if w not in COLOUR_RGB and w not in SHAPE_NAMES]
    filler = Filler(lexicon, rng, pool or None)
    question = lexicon.first(
        "What colour is the {shape} in the image? Answer with one word.",
        "what colour is the {shape} ?",
        "what colour is the {shape}",
        shape=target,
    )
    prefix = lexicon.first("The {shape} is", "", shape=target)
    return Sample(
        "visual_needle",
        index,
        question,
        prefix,
        (colour,),
        lambda n: with_inserts(filler, n, [(depth, IMAGE)]),
        image=image,
        meta={"cell": int(cells[0]), "shape": target},
    )


TASKS = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "visual_needle": visual_needle,
}
TEXT_TASKS = tuple(t for t in TASKS if t != "visual_needle")
# Tokens each task's answer needs (more for lists of answers).
MAX_NEW_TOKENS = {
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "variable_tracking": 40,
    "common_words": 64,
    "visual_needle": 8,
}


def make_sample(task: str, lexicon: Lexicon, seed: int, index: int, **options) -> Sample:
    """Sample ``index`` of ``task`` for ``seed``: the same on every machine for one tokenizer."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, list(TASKS).index(task), index])
    return TASKS[task](lexicon, rng, index, **options)
