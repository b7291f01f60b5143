"""A synthetic visual question-answering world: many small objects, one question, few that matter.

An image is a GRID x GRID board of CELL-pixel cells on a dark background; MIN_OBJECTS to
MAX_OBJECTS cells hold one small coloured shape each. With the tiny model's 8-pixel patches and
2x2 merge, one cell is exactly one visual token of the language model, so a 224x224 image gives
196 visual tokens, of which only the one to four holding the asked-about objects decide the answer.

Question types (balanced: sample ``index`` has type ``QUESTION_TYPES[index % 4]``):
- ``shape_of_colour``  "what shape is the red object ?"   the only red object; answer a shape
- ``colour_of_shape``  "what colour is the triangle ?"    the only triangle; answer a colour
- ``count_shape``      "how many triangles are there ?"   1 to 4 of them; answer a number word
- ``exists``           "is there a blue square ?"         yes / no; both the colour and the shape
                       appear on other objects, so neither word alone gives the answer

Every answer is one word. It is also the first generated token: under the dense prefill
(docs/design.md#the-prefill) it never sees the pruned cache, so there pruning cannot change an
answer: see
bench/sparsity_forcing_experiments.md. Samples are pure functions of (split, index): the train split uses
seeds [0, 1e9), the held-out split seeds [1e9, 2e9), so the two never share a scene.
"""

from dataclasses import dataclass

import numpy as np

from ..common import SPLIT_SEED_OFFSET, SPLIT_SIZE

GRID = 14
CELL = 16
IMAGE_SIZE = GRID * CELL
SHAPE_SIZE = 12
# Shapes sit centred in their cell. Random offsets would make each shape look different to each
# 8-pixel patch it straddles; a tiny vision tower trained for minutes could not learn that.
SHAPE_OFFSET = (CELL - SHAPE_SIZE) // 2
BACKGROUND = 40
BACKGROUND_NOISE = 0
COLOUR_JITTER = 0
MIN_GRID = 2
MIN_OBJECTS, MAX_OBJECTS = 6, 10
MAX_COUNT = 4

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("shape_of_colour", "colour_of_shape", "count_shape", "exists")


@dataclass(frozen=True)
class SceneObject:
    row: int
    col: int
    shape: str
    colour: str


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_TYPES
    shape: str | None = None
    colour: str | None = None

    @property
    def text(self) -> str:
        if self.kind == "shape_of_colour":
            return f"what shape is the {self.colour} object ?"
        if self.kind == "colour_of_shape":
            return f"what colour is the {self.shape} ?"
        if self.kind == "count_shape":
            return f"how many {PLURALS[self.shape]} are there ?"
        return f"is there a {self.colour} {self.shape} ?"


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    image: np.ndarray  # uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]
    objects: tuple[SceneObject, ...]
    question: Question
    answer: str


def answer_for(objects, question: Question) -> str:
    """The answer to `question` about a scene, derived from its object list alone."""
    if question.kind == "shape_of_colour":
        (match,) = [o for o in objects if o.colour == question.colour]
        return match.shape
    if question.kind == "colour_of_shape":
        (match,) = [o for o in objects if o.shape == question.shape]
        return match.colour
    if question.kind == "count_shape":
        return NUMBER_WORDS[sum(o.shape == question.shape for o in objects)]
    return (
        "yes"
        if any(o.shape == question.shape and o.colour == question.colour for o in objects)
        else "no"
    )


def shape_mask(shape: str, size: int = SHAPE_SIZE) -> np.ndarray:
    """Boolean [size, size] mask of a shape filling its box."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "circle":
        return (y - c) ** 2 + (x - c) ** 2 <= c * c
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":  # apex up, base along the bottom row
        return np.abs(x - c) <= y / 2
    if shape == "diamond":
        return np.abs(x - c) + np.abs(y - c) <= c
    if shape == "cross":
        arm = size / 6
        return (np.abs(x - c) <= arm) | (np.abs(y - c) <= arm)
    raise ValueError(f"unknown shape {shape!r}")


SHAPE_MASKS = {shape: shape_mask(shape) for shape in SHAPES}


def _scene_for(
    kind: str, max_objects: int, rng: np.random.Generator
) -> tuple[list[tuple[str, str]], Question]:
    """(shape, colour) pairs of every object, and the question, for one question type."""
    colours = list(COLOURS)
    n = min(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)), max_objects)

    def pick(options):
        return str(options[rng.integers(len(options))])

    def others(excluded_shape=None, excluded_colour=None, excluded_pair=None):
        while True:
            pair = (
                pick([s for s in SHAPES if s != excluded_shape]),
                pick([c for c in colours if c != excluded_colour]),
            )
            if pair != excluded_pair:
                return pair

    if kind == "shape_of_colour":
        colour = pick(colours)
        objects = [(pick(SHAPES), colour)] + [others(excluded_colour=colour) for _ in range(n - 1)]
        return objects, Question(kind, colour=colour)
    if kind == "colour_of_shape":
        shape = pick(SHAPES)
        objects = [(shape, pick(colours))] + [others(excluded_shape=shape) for _ in range(n - 1)]
        return objects, Question(kind, shape=shape)
    if kind == "count_shape":
        shape, count = pick(SHAPES), int(rng.integers(1, MAX_COUNT + 1))
        objects = [(shape, pick(colours)) for _ in range(count)]
        objects += [others(excluded_shape=shape) for _ in range(n - count)]
        return objects, Question(kind, shape=shape)
    if kind == "exists":
        shape, colour = pick(SHAPES), pick(colours)
        # The colour and the shape both appear elsewhere, so only their conjunction answers it.
        objects = [
            (shape, others(excluded_colour=colour)[1]),
            (others(excluded_shape=shape)[0], colour),
        ]
        if rng.random() < 0.5:
            objects.append((shape, colour))
        objects += [others(excluded_pair=(shape, colour)) for _ in range(n - len(objects))]
        return objects, Question(kind, shape=shape, colour=colour)
    raise ValueError(f"unknown question type {kind!r}")


def render(objects, grid: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB image of the scene: noisy background, each shape centred in its cell."""
    size = grid * CELL
    image = BACKGROUND + rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, (size, size, 3))
    for obj in objects:
        top, left = obj.row * CELL + SHAPE_OFFSET, obj.col * CELL + SHAPE_OFFSET
        colour = np.array(COLOURS[obj.colour]) + rng.integers(
            -COLOUR_JITTER, COLOUR_JITTER + 1, size=3
        )
        box = image[top : top + SHAPE_SIZE, left : left + SHAPE_SIZE]
        box[SHAPE_MASKS[obj.shape]] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def make_sample(split: str, index: int, grid: int = GRID, max_objects: int = MAX_OBJECTS) -> Sample:
    """Sample `index` of `split`: the same image, question and answer on every machine.

    The task is the GRID x GRID board with MIN_OBJECTS..MAX_OBJECTS objects. Smaller boards and
    fewer objects (never fewer than the question needs; at most grid^2 / 2) exist only for the
    curriculum of sf_train.worlds.vqa.sft: with few objects among few visual tokens the model learns what
    shapes and colours look like and where to look much sooner; Qwen-VL takes any image size.
    """
    if not MIN_GRID <= grid <= GRID:
        raise ValueError(f"grid must be in [{MIN_GRID}, {GRID}], got {grid}")
    if split not in SPLIT_SEED_OFFSET:
        raise ValueError(f"split must be one of {list(SPLIT_SEED_OFFSET)}, got {split!r}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE}), got {index}")
    rng = np.random.default_rng(SPLIT_SEED_OFFSET[split] + index)
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    pairs, question = _scene_for(kind, min(max_objects, grid * grid // 2), rng)
    cells = rng.choice(grid * grid, size=len(pairs), replace=False)
    order = rng.permutation(len(pairs))  # the target object must not always come first
    objects = tuple(
        SceneObject(int(cells[i]) // grid, int(cells[i]) % grid, *pairs[j])
        for i, j in enumerate(order)
    )
    return Sample(
        split, index, render(objects, grid, rng), objects, question, answer_for(objects, question)
    )


def make_samples(
    split: str, start: int, count: int, grid: int = GRID, max_objects: int = MAX_OBJECTS
) -> list[Sample]:
    return [make_sample(split, i, grid, max_objects) for i in range(start, start + count)]


def well_posed_questions(objects) -> list[Question]:
    """Every question with a definite answer about a scene (unique referents, counts 1..MAX_COUNT,
    and "is there" pairs whose colour and shape both appear on some other object)."""
    shapes = [o.shape for o in objects]
    colours = [o.colour for o in objects]
    pairs = set(zip(shapes, colours))
    questions = [Question("shape_of_colour", colour=c) for c in COLOURS if colours.count(c) == 1]
    questions += [Question("colour_of_shape", shape=s) for s in SHAPES if shapes.count(s) == 1]
    questions += [
        Question("count_shape", shape=s) for s in SHAPES if 1 <= shapes.count(s) <= MAX_COUNT
    ]
    questions += [
        Question("exists", shape=s, colour=c)
        for s in SHAPES
        for c in COLOURS
        if any(p[0] == s and p[1] != c for p in pairs)
        and any(p[0] != s and p[1] == c for p in pairs)
    ]
    return questions


def training_questions(sample: Sample, count: int) -> list[tuple[Question, str]]:
    """The sample's own question and answer, then up to count - 1 more about the same image.

    Training asks several questions per image: each costs a few text tokens next to the image's
    hundreds, and gives the model that much more to learn from. Question types rotate so each is
    asked about equally; "is there" questions alternate between yes and no where both exist.
    """
    rng = np.random.default_rng([SPLIT_SEED_OFFSET[sample.split] + sample.index, 1])
    candidates = {kind: [] for kind in QUESTION_TYPES}
    for q in well_posed_questions(sample.objects):
        if q != sample.question:
            candidates[q.kind].append(q)
    exists_answers = {q: answer_for(sample.objects, q) for q in candidates["exists"]}
    chosen = [(sample.question, sample.answer)]
    start = QUESTION_TYPES.index(sample.question.kind) + 1
    for turn in range(start, start + 4 * count):
        if len(chosen) == count:
            break
        pool = candidates[QUESTION_TYPES[turn % len(QUESTION_TYPES)]]
        if pool and pool[0].kind == "exists":
            wanted = "yes" if turn // len(QUESTION_TYPES) % 2 == 0 else "no"
            pool = [q for q in pool if exists_answers[q] == wanted] or pool
        if pool:
            question = pool[int(rng.integers(len(pool)))]
            candidates[question.kind].remove(question)
            chosen.append((question, answer_for(sample.objects, question)))
    return chosen


def vocabulary() -> list[str]:
    """Every word a question or an answer can contain, in a fixed order (for the tokenizer)."""
    words = []
    for kind in QUESTION_TYPES:
        for q in (Question(kind, shape=s, colour=c) for s in SHAPES for c in COLOURS):
            words += q.text.split()
    words += list(SHAPES) + list(COLOURS) + list(NUMBER_WORDS) + ["yes", "no"]
    return list(dict.fromkeys(words))
