"""Seeded synthetic scenes with questions and answers, rendered with Pillow at 336 x 336.

A scene holds 1-6 objects (shape, colour, size) on a 3 x 3 grid, and sometimes a short text (a word
or a two-digit number) in a free cell. Every question has exactly one short answer derived from the
scene, so exact match scores it. Task types:

    caption   "Describe the image."            -> "large red circle top left , small blue square center"
    colour    "What colour is the square ?"      -> "blue"           (a shape that occurs once)
    count     "How many circles are there ?"     -> "2"              (0-4)
    exist     "Is there a green star ?"          -> "yes" / "no"     (balanced, POPE-style)
    position  "Where is the red circle ?"        -> "top left"       (an object that occurs once)
    ocr       "What does the text say ?"         -> "cat" / "42"     (scenes with text)
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SIZE = 336
CELL = SIZE // 3
SHAPES = ["circle", "square", "triangle", "diamond", "star"]
PLURAL = {s: s + "s" for s in SHAPES}
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
    "purple": (140, 40, 170), "orange": (245, 130, 20), "black": (20, 20, 20),
}
SIZES = ["small", "large"]
CELLS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
WORDS = ["cat", "dog", "sun", "box", "map", "car", "tree", "fish", "bird", "moon", "star", "ship", "key", "cup"]
NUMBERS = [str(n) for n in range(10, 100)]
TASKS = ["caption", "colour", "count", "exist", "position", "ocr"]
TEXT_PROBABILITY = 0.35


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    cell: int

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape} {CELLS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    text: str | None
    text_cell: int | None
    background: tuple[int, int, int]


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 6)
    has_text = rng.random() < TEXT_PROBABILITY
    cells = rng.sample(range(9), count + (1 if has_text else 0))
    things = tuple(
        Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), cell) for cell in sorted(cells[:count])
    )
    text = (rng.choice(WORDS) if rng.random() < 0.5 else rng.choice(NUMBERS)) if has_text else None
    shade = rng.randint(225, 255)
    return Scene(things, text, cells[count] if has_text else None, (shade, shade, rng.randint(215, 255)))


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        radius = (40 if thing.size == "large" else 20) + rng.randint(-3, 3)
        cx = (thing.cell % 3) * CELL + CELL // 2 + rng.randint(-8, 8)
        cy = (thing.cell // 3) * CELL + CELL // 2 + rng.randint(-8, 8)
        _draw_shape(draw, thing.shape, cx, cy, radius, COLOURS[thing.colour])
    if scene.text is not None:
        cx = (scene.text_cell % 3) * CELL + CELL // 2
        cy = (scene.text_cell // 3) * CELL + CELL // 2
        draw.text((cx, cy), scene.text, fill=(10, 10, 10), font=_font(34), anchor="mm")
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        draw.regular_polygon((cx, cy, r), n_sides=5, fill=fill)  # a pentagon "star", distinct from the rest
        draw.polygon([(cx, cy - r - r // 3), (cx - r // 3, cy - r // 2), (cx + r // 3, cy - r // 2)], fill=fill)


def caption(scene: Scene) -> str:
    return " , ".join(t.phrase for t in scene.things)


def question(scene: Scene, task: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of one task about the scene; raises LookupError if the task does not apply."""
    things = scene.things
    if task == "caption":
        return "Describe the image .", caption(scene)
    if task == "ocr":
        if scene.text is None:
            raise LookupError("no text")
        return "What does the text say ?", scene.text
    if task == "count":
        shape = rng.choice(SHAPES)
        return f"How many {PLURAL[shape]} are there ?", str(sum(t.shape == shape for t in things))
    if task == "exist":
        present = {(t.colour, t.shape) for t in things}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(present))
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = rng.choice(absent)
        return f"Is there a {colour} {shape} ?", "yes" if (colour, shape) in present else "no"
    if task == "colour":
        unique = [t for t in things if sum(u.shape == t.shape for u in things) == 1]
        if not unique:
            raise LookupError("no shape occurs once")
        thing = rng.choice(unique)
        return f"What colour is the {thing.shape} ?", thing.colour
    if task == "position":
        unique = [t for t in things if sum((u.shape, u.colour) == (t.shape, t.colour) for u in things) == 1]
        thing = rng.choice(unique)
        return f"Where is the {thing.colour} {thing.shape} ?", CELLS[thing.cell]
    raise ValueError(f"unknown task {task!r}")


def example(rng: random.Random, task: str | None = None) -> tuple[Image.Image, Scene, str, str, str]:
    """One (image, scene, task, prompt, answer); a task that does not apply draws a new scene."""
    while True:
        scene = random_scene(rng)
        chosen = task or rng.choice(TASKS)
        try:
            prompt, answer = question(scene, chosen, rng)
        except LookupError:
            continue
        return render(scene, rng), scene, chosen, prompt, answer


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def vocabulary() -> list[str]:
    """Every word a prompt or answer can contain (the tokenizer's vocabulary)."""
    words = set()
    rng = random.Random(0)
    for _ in range(3000):
        scene = random_scene(rng)
        for task in TASKS:
            try:
                prompt, answer = question(scene, task, rng)
            except LookupError:
                continue
            words.update(prompt.split() + answer.split())
    words.update(SHAPES + list(PLURAL.values()) + list(COLOURS) + SIZES + WORDS + NUMBERS + [str(n) for n in range(10)])
    words.update(" ".join(CELLS).split() + ["yes", "no", ",", ".", "?", "USER", ":", "ASSISTANT"])
    return sorted(words)
