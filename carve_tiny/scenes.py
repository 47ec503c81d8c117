"""Seeded synthetic scenes with questions and answers, rendered with Pillow at 336 x 336.

A scene holds objects (shape, colour, size) in distinct cells of a 3 x 3 grid and, in about a third
of the scenes, a short rendered text (a word or a two-digit number) in a free cell. Two variants
(`VARIANTS`): "simple" (carve-tiny's: 1-6 objects of two sizes, one or four patches each, on a flat
background) and "hard" (carve-tiny-hard's: 1-9 objects of three sizes, up to ~30 patches each, on a
textured, noisy background). Every
question has exactly one short answer derived from the scene, so exact match scores it:

    caption   "Describe the image."            -> "top left large red circle, center small blue square"
    colour    "What colour is the square?"     -> "blue"          (a shape that occurs once)
    count     "How many circles are there?"    -> "2"             (0-6, usually 0-3)
    exist     "Is there a green star?"         -> "yes" / "no"    (balanced 50/50, POPE-style random negatives)
    position  "Where is the red circle?"       -> "top left"      (a colour+shape that occurs once)
    ocr       "What does the text say?"        -> "cat" / "42"    (only asked about scenes with text)

Captions list the objects in reading order of their cells (row by row, left to right) as
"<cell> <size> <colour> <shape>", so they are fully determined by the scene. Everything is drawn
from a `random.Random` passed in by the caller: the same seed gives the same scenes, questions and
pixels.
"""

from __future__ import annotations

import io
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 336  # LLaVA-1.5's input size; 336 / 14 = 24 x 24 = 576 patches
PATCH = 14  # the towers' patch side (CLIP ViT-L/14, Qwen-VL): objects sit on this grid
CELL = SIZE // 3  # 112 px; cell centres (56, 168, 280) lie on the 14-px patch grid
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
# Objects sit on the 14-px patch grid: a small one (radius 6) inside one patch, a large one
# (radius 13) centred on a patch corner, over 2 x 2 patches; they move by whole patches in their cell.
RADIUS = {"small": 6, "large": 13}


@dataclass(frozen=True)
class Variant:
    """What kind of scene a corpus holds. `radius` maps size words to radii in pixels (a radius-6
    object sits inside one patch, larger ones on a patch corner); `moves` is the range of whole-patch
    moves of a non-small object inside its cell (small ones move -2..1, as in "simple")."""

    name: str
    radius: dict
    max_objects: int
    textured: bool
    moves: tuple[int, int] = (-2, 1)

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(self.radius)


VARIANTS = {
    "simple": Variant("simple", RADIUS, max_objects=6, textured=False),
    # a large hard object (radius 34, 68 px across) covers ~10-20 patches and touches up to ~30
    "hard": Variant("hard", {"small": 6, "medium": 13, "large": 34}, max_objects=9, textured=True, moves=(-1, 1)),
}
CELLS = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
WORDS = ("cat", "dog", "sun", "box", "map", "car", "tree", "fish", "bird", "moon", "ship", "key", "cup", "hat")
NUMBERS = tuple(str(n) for n in range(10, 100))
TASKS = ("caption", "colour", "count", "exist", "position", "ocr")
PROMPTS = {
    "caption": "Describe the image.",
    "colour": "What colour is the {shape}?",
    "count": "How many {shape}s are there?",
    "exist": "Is there a {colour} {shape}?",
    "position": "Where is the {colour} {shape}?",
    "ocr": "What does the text say?",
}
TEXT_PROBABILITY = 0.35
TEXT_COLOUR = (15, 15, 15)
FONT_SIZE = 28


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major

    @property
    def phrase(self) -> str:
        return f"{CELLS[self.cell]} {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]  # sorted by cell
    text: str | None = None
    text_cell: int | None = None
    background: tuple[int, int, int] = (245, 245, 245)
    variant: str = "simple"


def variant_of(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown scene variant {name!r}; one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def random_scene(rng: random.Random, max_objects: int | None = None, variant: str = "simple") -> Scene:
    """A scene of 1..max_objects objects (default: the variant's maximum)."""
    kind = variant_of(variant)
    count = rng.randint(1, max_objects or kind.max_objects)
    has_text = rng.random() < TEXT_PROBABILITY and count < 9  # the text needs a free cell
    cells = rng.sample(range(9), count + has_text)
    things = tuple(
        sorted(
            (
                Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(kind.sizes), cell)
                for cell in cells[:count]
            ),
            key=lambda t: t.cell,
        )
    )
    text = (rng.choice(WORDS) if rng.random() < 0.5 else rng.choice(NUMBERS)) if has_text else None
    low = 200 if kind.textured else 225  # a textured background spans a wider range of shades
    shade = rng.randint(low, 255)
    background = (shade, shade, rng.randint(low - 10, 255))
    return Scene(things, text, cells[count] if has_text else None, background, variant)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled Aileron (needs FreeType, Pillow >= 10.1)


def cell_centre(cell: int, size: tuple[int, int] = (SIZE, SIZE)) -> tuple[int, int]:
    """The pixel centre of a grid cell in an image of `size` (width, height): (56, 56) for cell 0 at 336."""
    width, height = size
    return (2 * (cell % 3) + 1) * width // 6, (2 * (cell // 3) + 1) * height // 6


def render(scene: Scene, rng: random.Random, with_masks: bool = False, size: tuple[int, int] | None = None):
    """Draw the scene; `rng` only moves objects by whole patches (up to 2) within their cells.

    `size` (width, height), default SIZE x SIZE: the scene is rendered natively at that size, not drawn
    at 336 and resized. The 3 x 3 grid of cells spans the image; objects and the text keep their
    336-px pixel sizes and stay on the 14-px patch grid (each cell's centre snapped to the nearest
    patch corner), so a patch shows what it shows at 336 at every size: a larger image is a wider
    view of the same kind of objects, a smaller one a tighter one. A move that would take an object
    out of its cell is cut short, and in the smallest cells (224 px images: 75 px) a large object
    shrinks by the few pixels it needs to fit. A resize instead would blur the noise, squash shapes on
    non-square images and put objects off the patch grid, where carve-tiny-hard's tower has never
    seen them (the carried tower then has to relearn shapes, which an hour on a CPU does not allow).
    At 336 x 336 nothing moves or shrinks (same integers, same draws from `rng`), so default
    renders are byte-identical.

    With `with_masks`, also return an "L" image of the same size where object k (0-based, in
    `scene.things` order) is painted with value k + 1, and the text's bounding box with 255 (the
    training script derives per-patch targets from it). The scene image is the same either way."""
    kind = variant_of(scene.variant)
    width, height = size or (SIZE, SIZE)
    if kind.textured:
        image = textured_background(scene.background, rng, (width, height))
    else:
        image = Image.new("RGB", (width, height), scene.background)
    draw = ImageDraw.Draw(image)
    mask = Image.new("L", (width, height), 0) if with_masks else None
    for index, thing in enumerate(scene.things):
        low, high = (-2, 1) if thing.size == "small" else kind.moves
        moves = rng.randint(low, high), rng.randint(low, high)
        cx, cy, radius = _place(thing, kind.radius[thing.size], moves, (width, height))
        _draw_shape(draw, thing.shape, cx, cy, radius, COLOURS[thing.colour])
        if mask is not None:
            _draw_shape(ImageDraw.Draw(mask), thing.shape, cx, cy, radius, index + 1)
    if scene.text is not None:
        font, centre = _font(FONT_SIZE), _on_patch_grid(cell_centre(scene.text_cell, (width, height)))
        draw.text(centre, scene.text, fill=TEXT_COLOUR, font=font, anchor="mm")
        if mask is not None:
            box = draw.textbbox(centre, scene.text, font=font, anchor="mm")
            ImageDraw.Draw(mask).rectangle(box, fill=255)
    if kind.textured:  # sensor-like noise over everything, objects included: no two patches are identical
        image = _add_noise(image, rng, sigma=4.0)
    return (image, mask) if with_masks else image


def _on_patch_grid(point: tuple[int, int]) -> tuple[int, int]:
    """The nearest patch corner (at 336 x 336 every cell centre already is one)."""
    return PATCH * round(point[0] / PATCH), PATCH * round(point[1] / PATCH)


def _place(thing: Thing, radius: int, moves: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int]:
    """(cx, cy, radius) of an object in an image of `size`: its cell's centre on the patch grid (a
    small one in the middle of the patch below-right of it), moved by `moves` whole patches as far as
    the cell allows, the radius cut to what the cell allows around that centre (unchanged at 336)."""
    width, height = size
    shift = PATCH // 2 if thing.size == "small" else 0
    anchor = [c + shift for c in _on_patch_grid(cell_centre(thing.cell, size))]
    column, row = thing.cell % 3, thing.cell // 3
    # the cell's first and last pixel on each axis (the image splits into thirds, as the questions do)
    bounds = [
        (math.ceil(column * width / 3), math.ceil((column + 1) * width / 3) - 1),
        (math.ceil(row * height / 3), math.ceil((row + 1) * height / 3) - 1),
    ]
    radius = min(radius, *(min(a - lo, hi - a) for a, (lo, hi) in zip(anchor, bounds)))
    centre = []
    for a, (lo, hi), k in zip(anchor, bounds, moves):
        fits = [m for m in range(-abs(k), abs(k) + 1) if lo <= a + PATCH * m - radius and a + PATCH * m + radius <= hi]
        centre.append(a + PATCH * min(fits, key=lambda m: abs(m - k)))
    return centre[0], centre[1], radius


TEXTURES = ("noise", "stripes", "checker", "blotches")


def textured_background(
    tint: tuple[int, int, int], rng: random.Random, size: tuple[int, int] = (SIZE, SIZE)
) -> Image.Image:
    """A background of `size` (width, height): the tint plus one of TEXTURES, +-10..25 grey levels, drawn
    from `rng` (the same draws whatever the size; periods and blocks are in pixels)."""
    width, height = size
    noise = np.random.default_rng(rng.randrange(2**32))
    kind, amplitude = rng.choice(TEXTURES), rng.uniform(10, 25)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "noise":
        pattern = noise.normal(0, 0.5, (height, width))
    elif kind == "stripes":  # a sine grating at a random angle and period
        angle, period = rng.uniform(0, math.pi), rng.uniform(8, 40)
        pattern = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    elif kind == "checker":
        block = rng.randint(6, 28)
        pattern = ((ys // block + xs // block) % 2) * 2.0 - 1.0
    else:  # blotches: a coarse random field, smoothly upsampled
        coarse = Image.fromarray(noise.uniform(0, 255, (6, 6)).astype(np.uint8), "L")
        pattern = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    pixels = np.asarray(tint, dtype=np.float32) + amplitude * pattern[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _add_noise(image: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    width, height = image.size
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = round(r * 0.85)  # about the area of the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + round(0.8 * r)), (cx + r, cy + round(0.8 * r))], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":  # five points, inner radius half the outer one
        points = []
        for k in range(10):
            radius, angle = (r if k % 2 == 0 else r * 0.5), -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def caption(scene: Scene) -> str:
    return ", ".join(t.phrase for t in scene.things)


def question(scene: Scene, task: str, rng: random.Random, exist_yes: bool | None = None) -> tuple[str, str]:
    """(prompt, answer) of one `task` question about the scene; LookupError if the task does not apply.

    For "exist", `exist_yes` forces the answer (corpora alternate it for an exact 50/50 split);
    None flips a fair coin."""
    things = scene.things
    if task == "caption":
        return PROMPTS[task], caption(scene)
    if task == "ocr":
        if scene.text is None:
            raise LookupError("the scene has no text")
        return PROMPTS[task], scene.text
    if task == "count":
        # mostly a shape that is there (so the answer is not nearly always "0"), sometimes any shape
        shape = rng.choice(things).shape if rng.random() < 0.7 else rng.choice(SHAPES)
        return PROMPTS[task].format(shape=shape), str(sum(t.shape == shape for t in things))
    if task == "exist":
        present = sorted({(t.colour, t.shape) for t in things})
        if exist_yes is None:
            exist_yes = rng.random() < 0.5
        if exist_yes:
            colour, shape = rng.choice(present)
        else:
            colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
        return PROMPTS[task].format(colour=colour, shape=shape), "yes" if (colour, shape) in present else "no"
    if task == "colour":
        unique = [t for t in things if sum(u.shape == t.shape for u in things) == 1]
        if not unique:
            raise LookupError("no shape occurs exactly once")
        thing = rng.choice(unique)
        return PROMPTS[task].format(shape=thing.shape), thing.colour
    if task == "position":
        unique = [t for t in things if sum((u.shape, u.colour) == (t.shape, t.colour) for u in things) == 1]
        if not unique:
            raise LookupError("no colour and shape occur exactly once")
        thing = rng.choice(unique)
        return PROMPTS[task].format(colour=thing.colour, shape=thing.shape), CELLS[thing.cell]
    raise ValueError(f"unknown task {task!r}")


def cell_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A training-only grounding question: what is in a given cell ("large red circle", "text", "nothing")."""
    occupied = [t.cell for t in scene.things] + ([scene.text_cell] if scene.text is not None else [])
    cell = rng.choice(occupied) if rng.random() < 0.75 else rng.randrange(9)
    thing = next((t for t in scene.things if t.cell == cell), None)
    if thing is not None:
        answer = f"{thing.size} {thing.colour} {thing.shape}"
    else:
        answer = "text" if cell == scene.text_cell else "nothing"
    return f"What is in the {CELLS[cell]} cell?", answer


def example(
    rng: random.Random,
    task: str | None = None,
    exist_yes: bool | None = None,
    variant: str = "simple",
    size: tuple[int, int] | None = None,
) -> tuple[Image.Image, Scene, str, str, str]:
    """One (image, scene, task, prompt, answer); a scene the task does not apply to is redrawn. `size`
    (width, height) renders natively at that size (see `render`); it draws nothing from `rng`, so the
    scene, question and answer are those of the default size."""
    chosen = task or rng.choice(TASKS)
    while True:
        scene = random_scene(rng, variant=variant)
        try:
            prompt, answer = question(scene, chosen, rng, exist_yes)
        except LookupError:
            continue
        return render(scene, rng, size=size), scene, chosen, prompt, answer


SIDE_STEP = 28  # Qwen-VL's patch (14) x merge (2): its processor resizes each side to a multiple of it


def parse_sizes(text: str) -> tuple[int, int]:
    """ "224-448" -> (224, 448): the range of an image side in pixels (both ends multiples of SIDE_STEP)."""
    low, _, high = text.partition("-")
    low, high = int(low), int(high or low)
    if not (SIDE_STEP <= low <= high) or low % SIDE_STEP or high % SIDE_STEP:
        raise ValueError(f"sizes {text!r}: want LOW-HIGH, multiples of {SIDE_STEP} px, LOW <= HIGH")
    return low, high


def draw_size(rng: random.Random, sizes: tuple[int, int]) -> tuple[int, int]:
    """(width, height), each side drawn independently from the multiples of SIDE_STEP in `sizes`, so
    aspect ratios run from low:high to high:low and the Qwen-VL processor needs no resize (224-448:
    8 to 16 tokens a side, 64 to 256 visual tokens)."""
    sides = range(sizes[0], sizes[1] + 1, SIDE_STEP)
    return rng.choice(sides), rng.choice(sides)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def words(variant: str = "simple") -> list[str]:
    """Every whole word a prompt or answer of the variant can contain, split as the tokenizer's
    pre-tokenizer splits (numbers are left out: the tokenizer reads them digit by digit)."""
    texts = [t.format(colour=c, shape=s) for t in PROMPTS.values() for c in COLOURS for s in SHAPES]
    texts += [
        *COLOURS,
        *variant_of(variant).sizes,
        *WORDS,
        *CELLS,
        "yes",
        "no",
        "USER: ASSISTANT: , . ?",
        "What is in the cell? text nothing",
    ]
    return sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]+", text)})
