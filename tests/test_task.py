"""The synthetic visual QA task: deterministic, split cleanly, answers true to the pixels."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from sf_train.worlds import common
from sf_train.worlds.vqa import scene


def test_sample_is_a_pure_function_of_split_and_index():
    a, b = scene.make_sample("train", 12345), scene.make_sample("train", 12345)
    assert np.array_equal(a.image, b.image)
    assert (a.objects, a.question, a.answer) == (b.objects, b.question, b.answer)
    c = scene.make_sample("train", 12346)
    assert not np.array_equal(a.image, c.image)


def test_splits_are_disjoint():
    train = {s.image.tobytes() for s in scene.make_samples("train", 0, 200)}
    heldout = {s.image.tobytes() for s in scene.make_samples("heldout", 0, 200)}
    assert len(train) == len(heldout) == 200
    assert not train & heldout
    assert (
        max(common.SPLIT_SEED_OFFSET.values()) - min(common.SPLIT_SEED_OFFSET.values())
        >= common.SPLIT_SIZE
    )


def test_bad_split_or_index_is_an_error():
    with pytest.raises(ValueError):
        scene.make_sample("test", 0)
    with pytest.raises(ValueError):
        scene.make_sample("train", common.SPLIT_SIZE)


def test_every_question_type_and_answer_appears_and_answers_are_one_word():
    samples = scene.make_samples("heldout", 0, 400)
    kinds = Counter(s.question.kind for s in samples)
    assert set(kinds) == set(scene.QUESTION_TYPES) and len(set(kinds.values())) == 1
    answers = defaultdict(set)
    for s in samples:
        answers[s.question.kind].add(s.answer)
        assert len(common.normalise(s.answer)) == 1
        assert set(s.question.text.split()) <= set(scene.vocabulary())
    assert answers["shape_of_colour"] == set(scene.SHAPES)
    assert answers["colour_of_shape"] == set(scene.COLOURS)
    assert answers["count_shape"] == set(scene.NUMBER_WORDS[1 : scene.MAX_COUNT + 1])
    assert answers["exists"] == {"yes", "no"}


def drawn_at_some_offset(foreground, mask):
    """Whether the foreground pixels of a cell are exactly `mask`, shifted by a legal jitter."""
    (fy, fx), (my, mx) = np.argwhere(foreground).min(0), np.argwhere(mask).min(0)
    dy, dx = fy - my, fx - mx  # align the top-left corners of the two bounding boxes
    if not (0 <= dy <= scene.CELL - scene.SHAPE_SIZE and 0 <= dx <= scene.CELL - scene.SHAPE_SIZE):
        return False
    placed = np.zeros_like(foreground)
    placed[dy : dy + scene.SHAPE_SIZE, dx : dx + scene.SHAPE_SIZE] = mask
    return np.array_equal(placed, foreground)


def parse_image(image):
    """Recover (row, col, shape, colour) of every object from the pixels alone."""
    found = set()
    masks = {shape: scene.shape_mask(shape) for shape in scene.SHAPES}
    palette = np.array(list(scene.COLOURS.values()), dtype=float)
    grid = image.shape[0] // scene.CELL
    for row in range(grid):
        for col in range(grid):
            cell = image[
                row * scene.CELL : (row + 1) * scene.CELL, col * scene.CELL : (col + 1) * scene.CELL
            ]
            foreground = cell.max(-1) > scene.BACKGROUND + 3 * scene.BACKGROUND_NOISE
            if not foreground.any():
                continue
            mean = cell[foreground].astype(float).mean(0)
            colour = list(scene.COLOURS)[int(np.argmin(((palette - mean) ** 2).sum(-1)))]
            shapes = {
                shape for shape, mask in masks.items() if drawn_at_some_offset(foreground, mask)
            }
            assert len(shapes) == 1, f"cell ({row}, {col}) matches shapes {shapes}"
            found.add((row, col, shapes.pop(), colour))
    return found


def answer_from(objects, question):
    """The answer, re-derived independently of scene.answer_for."""
    shapes = [shape for _, _, shape, _ in objects]
    colours = [colour for _, _, _, colour in objects]
    if question.kind == "shape_of_colour":
        assert colours.count(question.colour) == 1
        return shapes[colours.index(question.colour)]
    if question.kind == "colour_of_shape":
        assert shapes.count(question.shape) == 1
        return colours[shapes.index(question.shape)]
    if question.kind == "count_shape":
        return ["zero", "one", "two", "three", "four"][shapes.count(question.shape)]
    # Both words must appear on other objects, so neither alone answers the question.
    assert question.colour in colours and question.shape in shapes
    assert any(s == question.shape and c != question.colour for _, _, s, c in objects)
    assert any(s != question.shape and c == question.colour for _, _, s, c in objects)
    return "yes" if (question.shape, question.colour) in zip(shapes, colours) else "no"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_answers_follow_from_the_rendered_pixels(split):
    for s in scene.make_samples(split, 0, 60):
        parsed = parse_image(s.image)
        assert parsed == {(o.row, o.col, o.shape, o.colour) for o in s.objects}
        assert answer_from(sorted(parsed), s.question) == s.answer
        assert scene.MIN_OBJECTS <= len(s.objects) <= scene.MAX_OBJECTS


@pytest.mark.parametrize("grid, max_objects", [(2, 1), (3, 2), (4, 6), (7, 10)])
def test_curriculum_boards_are_smaller_and_just_as_true(grid, max_objects):
    for s in scene.make_samples("train", 0, 40, grid, max_objects):
        assert s.image.shape == (grid * scene.CELL, grid * scene.CELL, 3)
        parsed = parse_image(s.image)
        assert parsed == {(o.row, o.col, o.shape, o.colour) for o in s.objects}
        assert answer_from(sorted(parsed), s.question) == s.answer
        assert len(s.objects) <= max(max_objects, scene.MAX_COUNT, 3)  # what the question needs
    with pytest.raises(ValueError):
        scene.make_sample("train", 0, grid=scene.GRID + 1)


def test_training_questions_are_well_posed_and_start_with_the_samples_own():
    kinds = Counter()
    for s in scene.make_samples("train", 0, 40):
        questions = scene.training_questions(s, 6)
        assert questions == scene.training_questions(s, 6)
        assert questions[0] == (s.question, s.answer)
        assert len(set(q for q, _ in questions)) == len(questions) == 6
        parsed = sorted(parse_image(s.image))
        for question, answer in questions:
            assert answer_from(parsed, question) == answer
            kinds[question.kind] += 1
    assert min(kinds.values()) >= 0.15 * sum(kinds.values())


def test_image_shape_and_visual_tokens():
    image = scene.make_sample("train", 0).image
    assert image.shape == (scene.IMAGE_SIZE, scene.IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert scene.GRID * scene.GRID == 196  # one visual token per cell with 8-px patches, 2x2 merge


@pytest.mark.parametrize(
    "completion, correct",
    [
        ("red", 1),
        ("Red.", 1),
        (" red ", 1),
        ("RED!", 1),
        ("red\n", 1),
        ("red blue", 1),
        ("red, i think", 1),
        ("reddish", 0),
        ("blue red", 0),
        ("", 0),
        ("  ", 0),
        ("...", 0),
        ("re d", 0),
        ("the red", 0),
    ],
)
def test_is_correct_checks_the_first_word_exactly(completion, correct):
    assert common.is_correct("what colour is the triangle ?", completion, "red") == correct


@pytest.mark.parametrize(
    "completion, correct",
    [
        ("answer v7", 1),
        ("Answer: V7.", 1),
        ("answer v7 v8", 1),
        ("answer v71", 0),
        ("v7", 0),
        ("answer", 0),
        ("", 0),
    ],
)
def test_is_correct_matches_every_word_of_a_multi_word_answer(completion, correct):
    assert common.is_correct("", completion, "answer v7") == correct


def test_text_only_baselines_are_far_below_the_target():
    """A model that ignores the image cannot get near 90%: majority answer per question type, and
    the stronger majority answer per exact question text, fitted on train and scored on held-out."""
    train, heldout = scene.make_samples("train", 0, 4000), scene.make_samples("heldout", 0, 1000)
    for key in (lambda s: s.question.kind, lambda s: s.question.text):
        votes = defaultdict(Counter)
        for s in train:
            votes[key(s)][s.answer] += 1
        hits = [
            votes[key(s)].most_common(1)[0][0] == s.answer if votes[key(s)] else 0 for s in heldout
        ]
        assert np.mean(hits) < 0.45
