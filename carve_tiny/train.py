"""Train carve-tiny from scratch on generated scenes; reproducible from a seed, on a CPU.

    python -m carve_tiny.train --out models/carve-tiny --seed 0     # the bundled model: 42.8 min on 2 CPU cores
    python -m carve_tiny.train --scenes hard --out models/carve-tiny-hard --seed 0   # the harder one (8 layers)

Data: generated on the fly from the seed (nothing is read from disk). Every training row is one
scene: its image followed by up to `QUESTIONS[task]` questions of every task that applies to the
scene and training-only grounding questions ("What is in the top left cell?"). The questions share
the image but never see each other: each one is a branch with its own attention mask and position
ids, so every branch is exactly the single-turn inference prompt
`<s> USER: <image>\\n{question} ASSISTANT: {answer}</s>`, and the 576-token image is encoded once for
all of them. A short curriculum starts with scenes of at most 2 objects and reaches the full 1-6 by
`--curriculum` steps.

Objective: cross-entropy on the answer tokens and </s> (vision tower, projector and decoder all
trained from scratch, end to end), plus an auxiliary dense loss that is used in training only: a
linear probe on the projector's output (the 576 visual tokens the decoder reads) predicts, for
every patch, the colour / shape / size of the object under it, the text written there and, for the
patches of an object or the text, its grid cell. It makes the from-scratch vision tower useful
within a CPU budget; the probe is thrown away and the saved model is a plain
`LlavaForConditionalGeneration`. The forward pass runs under bfloat16 autocast (~15 % faster on this
CPU; weights and optimizer state stay float32).

The learning-rate schedule is a function of the step (warm-up, then cosine), so a run is a function
of its seed and flags (and of the float arithmetic of the machine); --max-minutes only stops a run
early, and it still saves.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import (
    BOS,
    DECODER_LAYERS,
    EOS,
    IMAGE,
    IMAGE_TOKENS,
    PAD,
    PATCH,
    QWEN_ROPE,
    QWEN_SIDES,
    QWEN_TOKENS,
    build_untrained,
    build_untrained_qwen,
    pixel_values,
    save,
    save_qwen,
)
from .scenes import (
    COLOURS,
    SHAPES,
    SIZE,
    VARIANTS,
    WORDS,
    Scene,
    cell_question,
    draw_size,
    parse_sizes,
    question,
    random_scene,
    render,
    variant_of,
)

IGNORE = -100
GRID = SIZE // PATCH  # 24
# the auxiliary per-patch targets: name -> number of classes (class 0 = "none" where there is one)
PATCH_HEADS = {
    "colour": 1 + len(COLOURS),
    "shape": 1 + len(SHAPES),
    "size": 1 + len(VARIANTS["simple"].sizes),  # patch_heads() sets it per scene variant
    "cell": 9,
    "word": 1 + len(WORDS),
    "tens": 11,
    "units": 11,
    "anchor": 2,
}
# column of each head in the [patches, heads] target matrix (the probe's heads, in the same order)
COLUMN = {name: column for column, name in enumerate(PATCH_HEADS)}
# the heads that say something is under a patch (an object or the text); the cell head says where it is
CONTENT_COLUMNS = [column for name, column in COLUMN.items() if name != "cell"]
# What the probe's "cell" head learns: "every-patch", the grid cell of every patch (9 classes), or
# "objects", the cell of the object or text under a patch and class 0 on the background (10 classes),
# so the background's features need not carry a cell code that a loose attention mixes in.
CELL_TARGETS = ("every-patch", "objects")


def patch_heads(cell_target: str = "every-patch", scenes: str = "simple") -> dict[str, int]:
    if cell_target not in CELL_TARGETS:
        raise ValueError(f"unknown cell target {cell_target!r}; one of {CELL_TARGETS}")
    sizes = 1 + len(variant_of(scenes).sizes)
    return {**PATCH_HEADS, "size": sizes, "cell": 9 if cell_target == "every-patch" else 10}


@dataclass(frozen=True)
class Layout:
    """How an architecture lays one scene's image into the prompt: LLaVA's 576 `<image>` tokens of a
    336 x 336 image (the default), or Qwen2.5-VL's `<|vision_start|>`, one `<|image_pad|>` per 28 x 28 px
    of a native-size image, `<|vision_end|>`, with 3-D positions from the model's own `get_rope_index`."""

    image: int = IMAGE
    sizes: tuple[int, int] | None = None  # native sizes (Qwen): each side drawn from this range
    vision_start: int | None = None
    vision_end: int | None = None
    rope_index: object = None  # Qwen: the model's get_rope_index
    image_processor: object = None  # Qwen: the checkpoint's image processor

    @property
    def qwen(self) -> bool:
        return self.rope_index is not None

    @property
    def token_px(self) -> int:
        """Pixels a side per visual token: a patch, or a 2 x 2 merge of patches."""
        return 2 * PATCH if self.qwen else PATCH

    def image_ids(self, size: tuple[int, int] | None) -> list[int]:
        if not self.qwen:
            return [IMAGE] * IMAGE_TOKENS
        tokens = (size[0] // self.token_px) * (size[1] // self.token_px)
        return [self.vision_start, *[self.image] * tokens, self.vision_end]

    def pixels(self, images) -> dict[str, torch.Tensor]:
        if not self.qwen:
            return {"pixel_values": pixel_values(images)}
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


LLAVA = Layout()


def qwen_layout(model, processor, sizes: tuple[int, int] = QWEN_SIDES) -> Layout:
    vocab = processor.tokenizer.get_vocab()
    return Layout(
        image=vocab[QWEN_TOKENS["image_token"]],
        sizes=sizes,
        vision_start=vocab[QWEN_TOKENS["vision_bos_token"]],
        vision_end=vocab[QWEN_TOKENS["vision_eos_token"]],
        rope_index=model.model.get_rope_index,
        image_processor=processor.image_processor,
    )


class Encoder:
    """Token ids of prompt pieces, cached (tokenizing is the slow part of batching)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]


@dataclass
class Row:
    image: object  # PIL image
    ids: list[int]
    labels: list[int]
    branch: list[int]  # 0: shared prefix, k >= 1: k-th question
    tasks: list[str]  # task of branch k at index k - 1
    targets: torch.Tensor  # [visual tokens, len(PATCH_HEADS)] per-token auxiliary targets
    grid: tuple[int, int] = (GRID, GRID)  # visual tokens (rows, columns)
    owner: np.ndarray | None = None  # distillation: per visual token, see `token_owner`
    teacher_image: object = None  # distillation: the same scene at 336 x 336, for the LLaVA teacher
    teacher_owner: np.ndarray | None = None


# a token shows an object (or the text) when it covers at least 15 % of a 14-px patch's area
LEAST_COVER = 0.15 * PATCH * PATCH


def token_pixels(mask, token_px: int) -> tuple[np.ndarray, int, int]:
    """The render's mask cut into visual tokens: ([tokens, token_px^2] row-major, rows, columns)."""
    height, width = np.asarray(mask).shape
    rows_n, cols_n = height // token_px, width // token_px
    pixels = np.asarray(mask).reshape(rows_n, token_px, cols_n, token_px).transpose(0, 2, 1, 3)
    return pixels.reshape(rows_n * cols_n, -1), rows_n, cols_n


def object_cover(pixels: np.ndarray, objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token, the object covering most of it and whether that covers LEAST_COVER (objects >= 1)."""
    counts = np.stack([(pixels == k + 1).sum(1) for k in range(objects)], 1)
    return counts.argmax(1), counts.max(1) >= LEAST_COVER


def text_cover(pixels: np.ndarray) -> np.ndarray:
    return (pixels == 255).sum(1) >= LEAST_COVER


def token_owner(mask, token_px: int, objects: int) -> np.ndarray:
    """Per visual token (row-major), what it shows by the rule of `patch_targets`: the index of the
    object covering most of it (if >= 15 % of a 14-px patch's area), `objects` for the text, -1 for none."""
    pixels, _, _ = token_pixels(mask, token_px)
    owner = np.full(len(pixels), -1, dtype=np.int64)
    owner[text_cover(pixels)] = objects
    if objects:
        best, covered = object_cover(pixels, objects)
        owner[covered] = best[covered]
    return owner


def occupied(targets):
    """Patches with an object or the text under them, from `patch_targets` rows (numpy or torch): those
    where any head but the cell has a class other than 0."""
    return (targets[:, CONTENT_COLUMNS] > 0).any(1)


def patch_targets(scene: Scene, mask, cell_target: str = "every-patch", token_px: int = PATCH) -> torch.Tensor:
    """Per-patch classes from the render's object mask: the object covering >= 15 % of a 14-px patch's
    area gives its colour / shape / size (and its first such patch is its "anchor"); patches in the
    text's box the text; every patch its grid cell, or with `cell_target="objects"` only the patches of
    an object or the text (1 + cell; 0 elsewhere). `token_px`: the pixels a side of one visual token
    (28 for Qwen's merged tokens), on an image of any size that is a multiple of it; row-major."""
    m, rows_n, cols_n = token_pixels(mask, token_px)
    targets = np.zeros((rows_n * cols_n, len(PATCH_HEADS)), dtype=np.int64)
    rows, cols = np.divmod(np.arange(rows_n * cols_n), cols_n)
    cell = COLUMN["cell"]
    targets[:, cell] = (3 * rows // rows_n) * 3 + 3 * cols // cols_n
    if scene.things:
        best, covered = object_cover(m, len(scene.things))
        for k, thing in enumerate(scene.things):
            where = covered & (best == k)
            targets[where, COLUMN["colour"]] = 1 + list(COLOURS).index(thing.colour)
            targets[where, COLUMN["shape"]] = 1 + SHAPES.index(thing.shape)
            targets[where, COLUMN["size"]] = 1 + variant_of(scene.variant).sizes.index(thing.size)
            if where.any():  # one "anchor" patch per object (its first patch in reading order), for counting
                targets[where.nonzero()[0][0], COLUMN["anchor"]] = 1
    if scene.text is not None:
        where = text_cover(m)
        if scene.text in WORDS:
            targets[where, COLUMN["word"]] = 1 + WORDS.index(scene.text)
        else:
            targets[where, COLUMN["tens"]] = 1 + int(scene.text[0])
            targets[where, COLUMN["units"]] = 1 + int(scene.text[1])
    if patch_heads(cell_target)["cell"] == 10:  # "objects": 1 + cell where something is, 0 elsewhere
        targets[:, cell] = np.where(occupied(targets), targets[:, cell] + 1, 0)
    return torch.from_numpy(targets)


# questions per training scene (at most; repeats of the same question are dropped). Several questions
# of one type about the same image, with different answers, make the decoder read the question.
QUESTIONS = {"caption": 1, "colour": 2, "count": 3, "exist": 4, "position": 6, "ocr": 1, "cell": 6}


def training_row(
    encode: Encoder,
    rng: random.Random,
    max_objects: int = 6,
    questions=None,
    cell_target: str = "every-patch",
    scenes: str = "simple",
    layout: Layout = LLAVA,
    teacher: bool = False,
) -> Row:
    """One scene: the prefix `<s> USER: <image>*576` (Qwen: `<s> USER: <|vision_start|><|image_pad|>*n
    <|vision_end|>` for an image of a size drawn from `layout.sizes`), then one branch per question:
    up to `questions[task]` of each task that applies (existence alternating yes / no), including the
    training-only "What is in the <cell> cell?"."""
    scene = random_scene(rng, max_objects, scenes)
    size = draw_size(rng, layout.sizes) if layout.sizes else None
    ids = [BOS, *encode("USER:"), *layout.image_ids(size)]
    labels, branch, tasks, seen = [IGNORE] * len(ids), [0] * len(ids), [], set()
    for task, count in (questions or QUESTIONS).items():
        for j in range(count):
            try:
                if task == "cell":
                    prompt, answer = cell_question(scene, rng)
                else:
                    prompt, answer = question(scene, task, rng, exist_yes=(j % 2 == 0) if task == "exist" else None)
            except LookupError:
                break
            if prompt in seen:
                continue
            seen.add(prompt)
            head, tail = encode(f"{prompt} ASSISTANT:"), [*encode(answer), EOS]
            ids += head + tail
            labels += [IGNORE] * len(head) + tail
            branch += [len(tasks) + 1] * (len(head) + len(tail))
            tasks.append(task)
    state = rng.getstate()
    image, mask = render(scene, rng, with_masks=True, size=size)
    grid = (image.height // layout.token_px, image.width // layout.token_px)
    row = Row(image, ids, labels, branch, tasks, patch_targets(scene, mask, cell_target, layout.token_px), grid)
    if teacher:  # the same scene, moves and texture draws at 336 x 336 (a copy of the stream: `rng` goes on as without)
        objects = len(scene.things)
        twin = random.Random()
        twin.setstate(state)
        row.teacher_image, teacher_mask = render(scene, twin, with_masks=True)
        row.owner = token_owner(mask, layout.token_px, objects)
        row.teacher_owner = token_owner(teacher_mask, PATCH, objects)
    return row


def collate(
    rows: list[Row],
    device="cpu",
    hide_background: float = 0.0,
    rng: random.Random | None = None,
    layout: Layout = LLAVA,
) -> dict[str, torch.Tensor]:
    """Right-padded batch with a [B, 1, L, L] boolean mask: causal within the prefix and within each
    branch, every branch sees the prefix, no branch sees another; positions restart per branch, after
    the prefix: LLaVA's 1-D positions ([B, L]), or Qwen's 3-D ones ([3, B, L]): the prefix's by the
    model's own get_rope_index (the image at (s, s + row, s + column)), each branch's text from the
    prefix's largest position + 1 on, as get_rope_index gives the single-turn prompt.

    `hide_background` (0..1): that fraction of the background patches (no object, no text under them)
    is masked out as attention keys: the training curriculum's way of letting a from-scratch decoder
    find the few informative visual tokens among 576 before it has to ignore the rest itself."""
    length, size = max(len(r.ids) for r in rows), len(rows)
    input_ids = torch.full((size, length), PAD)
    labels = torch.full((size, length), IGNORE)
    branch = torch.full((size, length), -1)
    for i, r in enumerate(rows):
        input_ids[i, : len(r.ids)] = torch.tensor(r.ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
        branch[i, : len(r.branch)] = torch.tensor(r.branch)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal & ((branch[:, :, None] == branch[:, None, :]) | (branch[:, None, :] == 0)) & (branch[:, None, :] >= 0)
    if hide_background > 0:
        generator = torch.Generator().manual_seed((rng or random).randrange(2**31))
        for i, r in enumerate(rows):
            start = r.ids.index(layout.image)
            hidden = ~occupied(r.targets) & (torch.rand(len(r.targets), generator=generator) < hide_background)
            mask[i, :, start + hidden.nonzero().flatten()] = False
    mask[:, :, 0] = True  # padding rows attend to <s> (no fully masked row)
    offsets = torch.zeros_like(branch)
    for i in range(size):
        for k in range(1, int(branch[i].max()) + 1):
            where = (branch[i] == k).nonzero().flatten()
            offsets[i, where] = torch.arange(len(where))
    position_ids = torch.zeros((3 if layout.qwen else 1, size, length), dtype=torch.long)
    for i, r in enumerate(rows):
        prefix = int((branch[i] == 0).sum())
        if layout.qwen:
            ids = input_ids[i : i + 1, :prefix]
            grid = torch.tensor([[1, 2 * r.grid[0], 2 * r.grid[1]]])  # in patches, before the 2 x 2 merge
            own = layout.rope_index(ids, mm_token_type_ids=(ids == layout.image).int(), image_grid_thw=grid)[0][:, 0]
        else:
            own = torch.arange(prefix)[None]
        position_ids[:, i, :prefix] = own
        after = branch[i] > 0
        position_ids[:, i, after] = int(own.max()) + 1 + offsets[i, after]
    batch = dict(
        input_ids=input_ids,
        attention_mask=mask[:, None],
        position_ids=position_ids if layout.qwen else position_ids[0],
        labels=labels,
        **layout.pixels([r.image for r in rows]),
    )
    return {k: v.to(device) for k, v in batch.items()}


def learning_rate(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_hits(logits: torch.Tensor, labels: torch.Tensor, rows: list[Row]) -> dict[str, list[int]]:
    """Teacher-forced exact match per task in this batch (every answer token and </s> right)."""
    right = (logits[:, :-1].argmax(-1) == labels[:, 1:]) | (labels[:, 1:] == IGNORE)
    hits: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        branch = torch.tensor(r.branch[1:] + [-1] * (labels.shape[1] - len(r.branch)), device=right.device)
        for k, task in enumerate(r.tasks, start=1):
            hits.setdefault(task, []).append(int(right[i][branch == k].all()))
    return hits


class PatchProbe(torch.nn.Module):
    """Training-only linear probe on the projector's output: one softmax per `patch_heads` entry
    (`cell=False`: all but the grid cell, which a tower without absolute positions cannot know)."""

    def __init__(self, width: int, cell_target: str = "every-patch", scenes: str = "simple", cell: bool = True):
        super().__init__()
        self.heads = patch_heads(cell_target, scenes)
        if not cell:
            del self.heads["cell"]
        self.dense = {"cell"} if cell_target == "every-patch" else set()  # heads where class 0 is a real class
        self.linear = torch.nn.Linear(width, sum(self.heads.values()))

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over heads; in every head but a dense one, the patches with something (class > 0) and
        the patches with nothing weigh half each, so that rare text patches and the shape of small
        objects count as much as the background."""
        logits = self.linear(features).flatten(0, 1).split(list(self.heads.values()), dim=-1)
        targets = targets.flatten(0, 1)
        total = 0.0
        for name, head in zip(self.heads, logits):
            target = targets[:, COLUMN[name]]
            losses = F.cross_entropy(head, target, reduction="none")
            present = target > 0
            if name in self.dense or not present.any():
                total = total + losses.mean()
            else:
                total = total + 0.5 * losses[present].mean() + 0.5 * losses[~present].mean()
        return total / len(self.heads)

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Per head, accuracy on the patches with something under them."""
        logits = self.linear(features).flatten(0, 1).split(list(self.heads.values()), dim=-1)
        targets = targets.flatten(0, 1)
        out = {}
        for name, head in zip(self.heads, logits):
            target = targets[:, COLUMN[name]]
            present = target > 0
            if present.any():
                out[name] = (head.argmax(-1)[present] == target[present]).float().mean().item()
        return out


def distill_loss(features: torch.Tensor, teacher: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Feature distillation across architectures and sizes: each of the student's visual tokens
    ([tokens of all rows, D], image order) is pulled towards the teacher's mean projector output
    ([rows, 576, D]) over the patches that show the same thing in the same scene at 336 x 336 (the same
    object, the text, or the background), so that the warm-started decoder reads familiar features
    from the start. Squared error relative to the teacher's mean square."""
    targets, start = [], 0
    for r, own in zip(rows, teacher):
        target = torch.zeros(len(r.owner), own.shape[-1], device=own.device)
        keep = torch.zeros(len(r.owner), dtype=torch.bool)
        for what in np.unique(r.owner):
            source = torch.as_tensor(r.teacher_owner == what, device=own.device)
            if source.any():
                where = torch.as_tensor(r.owner == what)
                target[where.to(own.device)] = own[source].mean(0)
                keep |= where
        targets.append((target, keep, start))
        start += len(r.owner)
    total, count = 0.0, 0
    for target, keep, begin in targets:
        student = features[begin : begin + len(keep)]
        total = total + ((student - target) ** 2)[keep.to(student.device)].sum()
        count += int(keep.sum()) * student.shape[-1]
    return total / max(1, count) / teacher.pow(2).mean()


POSITION_CLASSES = 1 + QWEN_SIDES[1] // (2 * PATCH)  # 0 (none) and 1 + 0..15


def position_targets(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """([visual tokens of all rows, 2], [rows, 2]): each object / text token's (1 + row, 1 + column) in
    its image's token grid (0, 0 on the background), and each image's grid (rows, columns)."""
    tokens = []
    for r in rows:
        index = torch.arange(r.grid[0] * r.grid[1])
        where = torch.as_tensor(occupied(r.targets))
        tokens.append(torch.stack([index // r.grid[1] + 1, index % r.grid[1] + 1], 1) * where[:, None])
    return torch.cat(tokens), torch.tensor([r.grid for r in rows])


class PositionProbe(torch.nn.Module):
    """Training-only linear probes on the decoder's hidden states at the input of layer `layer` (the
    cut's): on each object or text token its row and column in the token grid, and on <|vision_end|>
    the grid's height and width. Qwen's vision tower has no absolute position (2-D rotary is relative,
    windows and patch embedding are translation-invariant), so the decoder's mRoPE is the only place a
    visual token's position exists; these targets make layers 0-1 read it from there (a visual token at
    (s, s + row, s + column) against the text before the image), and <|vision_end|>, which sees the
    whole image, hold its size, from which later layers can tell the 3 x 3 cell (row / rows)."""

    def __init__(self, width: int):
        super().__init__()
        self.token = torch.nn.Linear(width, 2 * POSITION_CLASSES)
        self.grid = torch.nn.Linear(width, 2 * POSITION_CLASSES)

    def _logits(self, hidden, input_ids, layout):
        visual = hidden[input_ids == layout.image]
        end = hidden[input_ids == layout.vision_end]
        return self.token(visual).unflatten(-1, (2, -1)), self.grid(end).unflatten(-1, (2, -1))

    def loss(self, hidden, input_ids, rows: list[Row], layout: Layout) -> torch.Tensor:
        token_logits, grid_logits = self._logits(hidden, input_ids, layout)
        token_targets, grid_targets = (t.to(hidden.device) for t in position_targets(rows))
        total = 0.0
        for axis in (0, 1):
            losses = F.cross_entropy(token_logits[:, axis], token_targets[:, axis], reduction="none")
            present = token_targets[:, axis] > 0
            total = total + (
                0.5 * losses[present].mean() + 0.5 * losses[~present].mean() if present.any() else losses.mean()
            )
            total = total + F.cross_entropy(grid_logits[:, axis], grid_targets[:, axis])
        return total / 4

    @torch.no_grad()
    def accuracy(self, hidden, input_ids, rows: list[Row], layout: Layout) -> dict[str, float]:
        token_logits, grid_logits = self._logits(hidden, input_ids, layout)
        token_targets, grid_targets = (t.to(hidden.device) for t in position_targets(rows))
        present = token_targets[:, 0] > 0
        out = {}
        for axis, name in enumerate(("row", "col")):
            hit = token_logits[:, axis].argmax(-1) == token_targets[:, axis]
            out[name] = hit[present].float().mean().item() if present.any() else float("nan")
            out["grid_" + name] = (grid_logits[:, axis].argmax(-1) == grid_targets[:, axis]).float().mean().item()
        return out


@torch.no_grad()
def warm_start(model: torch.nn.Module, tokenizer, source_path: str | Path, new_tokens: str = "random") -> int:
    """Start `model` from a trained checkpoint (progressive growing, as in Net2Net / Gopher-style depth
    growth): every weight whose name and shape match is copied; rows of the token embedding and the
    output head are matched by token string, so a vocabulary that gained words (hard scenes' "medium")
    keeps every known word; decoder layers the source lacks start as identity blocks (their attention
    output and MLP down projections zeroed, so they add nothing until trained). Returns how many
    tensors were copied whole.

    Across architectures (carve-tiny-qwen from carve-tiny-hard): the decoder's weights have the same
    names and shapes (Qwen2 layers add q/k/v biases, which start at zero), and the CLIP tower and
    projector become the Qwen tower and merger (clip_to_qwen_tower)."""
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from tokencarve.families import family_for_config

    source = family_for_config(AutoConfig.from_pretrained(source_path)).model_class.from_pretrained(source_path)
    old_vocab = PreTrainedTokenizerFast.from_pretrained(source_path).get_vocab()
    new_vocab = tokenizer.get_vocab()
    shared = [(new_vocab[t], old_vocab[t]) for t in new_vocab if t in old_vocab]
    new_rows, old_rows = (torch.tensor(ids) for ids in zip(*shared))
    if new_tokens == "zero":  # tokens the source lacks (Qwen's vision tokens) add nothing until trained
        unseen = torch.tensor([i for t, i in new_vocab.items() if t not in old_vocab], dtype=torch.long)
        model.get_input_embeddings().weight[unseen] = 0.0
    source_state, copied = source.state_dict(), 0
    for name, tensor in model.state_dict().items():
        old = source_state.get(name)
        if old is None:
            continue
        if old.shape == tensor.shape:
            tensor.copy_(old)
            copied += 1
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")) and old.shape[1:] == tensor.shape[1:]:
            tensor[new_rows] = old[old_rows]
    if getattr(model.model, "visual", None) is not None and getattr(source.model, "vision_tower", None) is not None:
        copied += clip_to_qwen_tower(model, source)
    source_layers = source.config.text_config.num_hidden_layers
    for layer in model.model.language_model.layers[source_layers:]:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return copied


def clip_features(source, images) -> tuple[torch.Tensor, torch.Tensor]:
    """(the CLIP tower's raw embeddings, patch + position, before its pre-norm; its last hidden
    states, what the projector reads) for 336-px images."""
    tower, pixels = source.model.vision_tower, pixel_values(images)
    return tower.embeddings(pixels), tower(pixels).last_hidden_state


@torch.no_grad()
def clip_to_qwen_tower(model, source, calibration_scenes: int = 16) -> int:
    """Carry a trained LLaVA tower (CLIP ViT + projector) into the Qwen2.5-VL tower and merger where
    the two architectures compute the same thing, so the fresh tower starts from features the
    warm-started decoder already reads. Returns how many tensors were set.

    - Patch embedding: split evenly over the two temporal slices (an image is its own two frames).
      CLIP's pre-LayerNorm is folded in where it is linear (its centring over channels and its gain);
      its division by each token's spread becomes one scale measured on rendered scenes.
    - Blocks 0..2 from CLIP's layers: LayerNorm = centring, RMS division, gain, bias; the centring,
      gain and bias fold into the next linear map (value, MLP input), leaving an RMSNorm of weight 1,
      which differs from the LayerNorm only when a token's channel mean is not zero. Values, output
      projection, MLP copied; CLIP's (fc1, quick-GELU, fc2) MLP is the gated MLP with its up
      projection a constant 1 (weight 0, bias 1): act(gate x) * 1. Queries and keys keep the local
      rotary init (init_qwen_vision_tower): CLIP's read ~90 % absolute position channels, which this
      tower does not have. Extra blocks start as identities (output projections zero).
    - Merger = projector(mean of the 2 x 2 patches): its first layer's first rows are the projector's
      first layer over the four patches, each / 4, the rest zero; its second layer reads those rows.
      Its RMSNorm weight is the CLIP output's typical RMS, so the merger sees CLIP-sized features."""
    visual, clip = model.model.visual, source.model.vision_tower
    projector = source.model.multi_modal_projector
    if visual.config.hidden_act != clip.config.hidden_act or visual.config.hidden_size != clip.config.hidden_size:
        raise ValueError("the Qwen tower needs the CLIP tower's width and activation to be carried over")
    rng = random.Random(0)
    images = [render(random_scene(rng, variant="hard"), rng) for _ in range(calibration_scenes)]
    raw, last = clip_features(source, images)
    width = clip.config.hidden_size
    centre = torch.eye(width) - 1.0 / width  # x -> x - mean(x) over channels
    # the pre-LayerNorm's per-token spread, measured on CLIP's raw embeddings (patch + position)
    spread = raw[:, 1:].std(-1, unbiased=False).median()
    pre = clip.pre_layrnorm
    weight = clip.embeddings.patch_embedding.weight  # [width, 3, p, p]
    folded = torch.einsum("oi,i...->o...", centre, weight) * (pre.weight / spread).view(-1, 1, 1, 1)
    visual.patch_embed.proj.weight.copy_(folded[:, :, None].expand_as(visual.patch_embed.proj.weight) / 2)
    count = 1
    for block, layer in zip(visual.blocks, clip.encoder.layers):
        attn = layer.self_attn
        v_weight = attn.v_proj.weight @ torch.diag(layer.layer_norm1.weight) @ centre
        block.attn.qkv.weight[2 * width :] = v_weight
        block.attn.qkv.bias[2 * width :] = attn.v_proj.bias + attn.v_proj.weight @ layer.layer_norm1.bias
        block.attn.proj.weight.copy_(attn.out_proj.weight)
        block.attn.proj.bias.copy_(attn.out_proj.bias)
        block.norm1.weight.fill_(1.0)
        block.norm2.weight.fill_(1.0)
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
        block.mlp.gate_proj.weight.copy_(fc1.weight @ torch.diag(layer.layer_norm2.weight) @ centre)
        block.mlp.gate_proj.bias.copy_(fc1.bias + fc1.weight @ layer.layer_norm2.bias)
        block.mlp.up_proj.weight.zero_()
        block.mlp.up_proj.bias.fill_(1.0)
        block.mlp.down_proj.weight.copy_(fc2.weight)
        block.mlp.down_proj.bias.copy_(fc2.bias)
        count += 11
    for block in visual.blocks[len(clip.encoder.layers) :]:
        for linear in (block.attn.proj, block.mlp.down_proj):
            linear.weight.zero_()
            linear.bias.zero_()
    merger, units = visual.merger, visual.config.spatial_merge_size**2
    merger.ln_q.weight.fill_(last[:, 1:].pow(2).mean(-1).sqrt().median())
    first, second = merger.mlp[0], merger.mlp[2]
    hidden = projector.linear_1.out_features
    first.weight.zero_()
    first.bias.zero_()
    first.weight[:hidden] = projector.linear_1.weight.repeat(1, units) / units
    first.bias[:hidden] = projector.linear_1.bias
    second.weight.zero_()
    second.weight[:, :hidden] = projector.linear_2.weight
    second.bias.copy_(projector.linear_2.bias)
    return count + 5


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", choices=sorted(VARIANTS), default="simple", help="scene variant (carve_tiny.scenes)")
    p.add_argument(
        "--arch",
        choices=("llava", "qwen"),
        default="llava",
        help="llava: LLaVA-1.5 (carve-tiny, carve-tiny-hard); qwen: Qwen2.5-VL at native sizes (carve-tiny-qwen)",
    )
    p.add_argument(
        "--sizes", type=parse_sizes, default=None, help="qwen: image sides drawn from LOW-HIGH px (default 224-448)"
    )
    p.add_argument(
        "--rope-theta",
        type=float,
        default=None,
        help="qwen: the decoder's mRoPE base (default QWEN_ROPE's; 1e6 = carve-tiny-hard's, so a warm-started "
        "decoder computes on text exactly as before)",
    )
    p.add_argument(
        "--position-weight",
        type=float,
        default=1.0,
        help="qwen: weight of the position probe on the decoder's hidden states at the cut (PositionProbe)",
    )
    p.add_argument(
        "--distill-from",
        default=None,
        help="qwen: a LLaVA checkpoint whose projector output the tower's output is pulled towards (distill_loss)",
    )
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument(
        "--freeze-decoder",
        type=int,
        default=0,
        help="the decoder and its head do not move for this many steps (a warm-started decoder waits "
        "while a fresh tower learns to give it familiar features)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="default: models/carve-tiny, models/carve-tiny-hard for hard scenes, models/carve-tiny-qwen for qwen",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this trained checkpoint (see warm_start; carve-tiny-hard starts from models/carve-tiny)",
    )
    p.add_argument(
        "--new-tokens",
        choices=("random", "zero"),
        default="random",
        help="with --init-from: embeddings of tokens the source lacks (random, or zero: inert until trained)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2900)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument(
        "--questions",
        default=",".join(f"{t}={n}" for t, n in QUESTIONS.items()),
        help="questions per scene and task (cell: training-only grounding questions)",
    )
    p.add_argument(
        "--curriculum",
        type=int,
        default=300,
        help="scenes hold at most 2 objects at first, growing to the variant's maximum by this step",
    )
    p.add_argument(
        "--hide-background",
        default="0.2,0.45",
        help="fractions of the run: background patches are hidden from the decoder until the first, "
        "then fewer and fewer, all visible from the second on ('0,0': never hidden)",
    )
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-patch probe loss (0: off)")
    p.add_argument(
        "--cell-target",
        choices=CELL_TARGETS,
        default="objects",
        help="which patches the probe's grid-cell head labels (objects: only those with an object or text)",
    )
    p.add_argument("--max-minutes", type=float, default=50.0, help="stop early (and still save) after this long")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the bundled model: 2)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="bfloat16",
        help="bfloat16: autocast the forward pass (weights and optimizer stay float32)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    qwen = args.arch == "qwen"
    if qwen:
        rope = dict(QWEN_ROPE, rope_theta=args.rope_theta) if args.rope_theta else None
        model, processor = build_untrained_qwen(seed=args.seed, scenes=args.scenes, rope=rope)
        layout = qwen_layout(model, processor, args.sizes or QWEN_SIDES)
    else:
        model, processor = build_untrained(seed=args.seed, scenes=args.scenes)
        layout = LLAVA
    if args.init_from:
        copied = warm_start(model, processor.tokenizer, args.init_from, args.new_tokens)
        print(f"warm start from {args.init_from}: {copied} tensors copied", flush=True)
    teacher, taught = None, {}
    if args.distill_from:
        from transformers import LlavaForConditionalGeneration

        teacher = LlavaForConditionalGeneration.from_pretrained(args.distill_from).eval().to(args.device)
        teacher.requires_grad_(False)
        teacher.model.multi_modal_projector.register_forward_hook(lambda m, i, o: taught.__setitem__("f", o))
    width = model.config.text_config.hidden_size
    probe = PatchProbe(width, args.cell_target, args.scenes, cell=not qwen)
    position_probe = PositionProbe(width) if qwen and args.position_weight > 0 else None
    most = variant_of(args.scenes).max_objects
    model.to(args.device).train()
    probe.to(args.device)
    captured = {}
    if qwen:  # the merger's output in image order (the tower's pooler output), and the cut's input
        hooks = [
            model.model.visual.register_forward_hook(lambda m, i, o: captured.__setitem__("f", o.pooler_output)),
            model.model.language_model.layers[2].register_forward_pre_hook(
                lambda m, args_: captured.__setitem__("h", args_[0])
            ),
        ]
    else:
        hooks = [model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))]
    probes = [probe] + ([position_probe] if position_probe is not None else [])
    for extra in probes:
        extra.to(args.device)
    named = [
        *model.named_parameters(),
        *(("probe." + n, q) for n, q in probe.named_parameters()),
        *(("position_probe." + n, q) for n, q in (position_probe.named_parameters() if position_probe else [])),
    ]
    decay = [q for n, q in named if q.ndim >= 2 and "embed" not in n]
    no_decay = [q for n, q in named if not (q.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.freeze_decoder:  # the warm-started decoder (and its head) apart, so that its learning rate can wait
        decoder = {id(q) for n, q in named if n.startswith(("model.language_model.", "lm_head."))}
        groups = [
            {**group, "params": [q for q in group["params"] if (id(q) in decoder) == frozen], "frozen": frozen}
            for group in groups
            for frozen in (False, True)
        ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    hide_from, hide_until = (float(x) for x in args.hide_background.split(","))
    questions = {t: int(n) for t, n in (item.split("=") for item in args.questions.split(","))}
    encode = Encoder(processor.tokenizer)
    rng = random.Random(args.seed)
    print(
        f"carve-tiny ({args.arch}, {args.scenes} scenes): {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters, {args.steps} steps "
        f"of {args.batch_size} scenes, device {args.device}, {args.threads} thread(s)",
        flush=True,
    )

    started, losses, aux_losses, hits, step, stopped_early = time.time(), [], [], {}, 0, False
    position_losses, probe_hits, distill_losses = [], {}, []
    for step in range(args.steps):
        if time.time() - started > args.max_minutes * 60:
            stopped_early = True
            print(f"time budget of {args.max_minutes} min reached after {step} steps", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
            if group.get("frozen") and step < args.freeze_decoder:
                group["lr"] = 0.0
        max_objects = min(most, 2 + ((most - 2) * step) // max(1, args.curriculum))
        rows = [
            training_row(
                encode, rng, max_objects, questions, args.cell_target, args.scenes, layout, teacher is not None
            )
            for _ in range(args.batch_size)
        ]
        hide = float(min(1.0, max(0.0, (hide_until - step / args.steps) / max(1e-9, hide_until - hide_from))))
        batch = collate(rows, args.device, hide, rng, layout)
        with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.precision == "bfloat16"):
            out = model(**batch)
        loss = out.loss
        if args.aux_weight > 0:
            targets = torch.cat([r.targets for r in rows]).to(args.device)[None]
            features = captured["f"].reshape(1, len(targets[0]), -1)
            aux = probe.loss(features.float(), targets)
            loss = loss + args.aux_weight * aux
            aux_losses.append(aux.item())
        if teacher is not None:
            with torch.no_grad():  # the hook keeps the projector's output, [rows, 576, D]
                teacher.model.get_image_features(
                    pixel_values=pixel_values([r.teacher_image for r in rows]).to(args.device),
                    vision_feature_layer=-1,
                    vision_feature_select_strategy="default",
                )
            distill = distill_loss(captured["f"].float(), taught["f"].float(), rows)
            loss = loss + args.distill_weight * distill
            distill_losses.append(distill.item())
        if position_probe is not None:
            hidden = captured["h"].float()
            position_loss = position_probe.loss(hidden, batch["input_ids"], rows, layout)
            loss = loss + args.position_weight * position_loss
            position_losses.append(position_loss.item())
            if (step + 1) % args.log_every == 0 or step == 0:
                probe_hits = position_probe.accuracy(hidden, batch["input_ids"], rows, layout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for _, q in named], 1.0)
        optimizer.step()
        losses.append(out.loss.item())
        with torch.no_grad():
            for task, h in answer_hits(out.logits, batch["labels"], rows).items():
                hits.setdefault(task, []).extend(h)
        if (step + 1) % args.log_every == 0 or step == 0:
            n = args.log_every
            tasks = " ".join(f"{t} {100 * sum(h) / max(1, len(h)):3.0f}" for t, h in sorted(hits.items()))
            aux_text = f"  aux {sum(aux_losses[-n:]) / len(aux_losses[-n:]):.3f}" if aux_losses else ""
            if distill_losses:
                aux_text += f"  distill {sum(distill_losses[-n:]) / len(distill_losses[-n:]):.3f}"
            if position_losses:
                aux_text += (
                    f"  position {sum(position_losses[-n:]) / len(position_losses[-n:]):.3f} probe %: "
                    + " ".join(f"{k} {100 * v:.0f}" for k, v in probe_hits.items())
                )
            print(
                f"step {step + 1:5d}  hide {hide:.2f}  loss {sum(losses[-n:]) / len(losses[-n:]):.4f}{aux_text}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.time() - started:6.0f}s  "
                f"teacher-forced exact %: {tasks}",
                flush=True,
            )
            hits = {}
    else:
        step = args.steps
    for hook in hooks:
        hook.remove()
    minutes = (time.time() - started) / 60
    default_out = "models/carve-tiny" if args.scenes == "simple" else "models/carve-tiny-hard"
    out_dir = Path(args.out or ("models/carve-tiny-qwen" if qwen else default_out))
    (save_qwen if qwen else save)(model.eval().to("cpu"), processor, out_dir)
    record = {
        "arch": args.arch,
        "sizes": list(layout.sizes) if qwen else None,
        "position_weight": args.position_weight if qwen else None,
        "rope_theta": model.config.text_config.rope_parameters["rope_theta"] if qwen else None,
        "distill_from": args.distill_from,
        "distill_weight": args.distill_weight if args.distill_from else None,
        "freeze_decoder": args.freeze_decoder,
        "scenes": args.scenes,
        "init_from": args.init_from,
        "new_tokens": args.new_tokens if args.init_from else None,
        "decoder_layers": DECODER_LAYERS[args.scenes],
        "seed": args.seed,
        "steps": step,
        "planned_steps": args.steps,
        "stopped_early": stopped_early,
        "batch_size": args.batch_size,
        "peak_lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "questions": questions,
        "curriculum": args.curriculum,
        "aux_weight": args.aux_weight,
        "hide_background": args.hide_background,
        "cell_target": args.cell_target,
        "precision": args.precision,
        "wall_minutes": round(minutes, 1),
        "device": args.device,
        "threads": args.threads,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "final_answer_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {out_dir} after {step} steps, {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
