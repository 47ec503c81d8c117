"""See what a budget keeps: the image under its visual-token grid (the paper's Figure 1c), as a PNG.

    python -m tokencarve.visualize --model models/carve-tiny --image scene.png \\
        --prompt "What colour is the star?" --keep 64 --out kept.png
    python -m tokencarve.visualize ... --method tokencarve,information,volume   # side by side, labelled

Kept tokens are clear; pruned tokens are greyed out; merged tokens are tinted with the colour of
the kept token they were merged into, and a line links them to it (that token gets an outline of
the same colour). The picture is the image as the model saw it (after the processor's resize and
crop), so every cell is exactly one visual token.
"""

from __future__ import annotations

import argparse
import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

import tokencarve
from tokencarve import CarveConfig, ImageCarve, load_llava
from tokencarve.loading import chat_prompt


def _palette(count: int) -> list[tuple[int, int, int]]:
    """`count` well separated, saturated colours (golden-ratio hues)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.95)) for k in range(count)]


def model_view(pixel_values: torch.Tensor, image_mean, image_std) -> Image.Image:
    """Undo the processor's normalisation of one [3, H, W] image."""
    mean, std = torch.tensor(image_mean)[:, None, None], torch.tensor(image_std)[:, None, None]
    array = ((pixel_values.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def render(image: Image.Image, carve: ImageCarve, scale: int = 2) -> Image.Image:
    """Draw the token grid of one image's carve over it."""
    num_tokens = carve.assignment.shape[0]
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} visual tokens do not form a square grid")
    image = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    cell_w, cell_h = image.width / side, image.height / side
    assignment, merged, index = carve.assignment.tolist(), carve.merged.tolist(), carve.index.tolist()
    colours = _palette(len(index))

    def box(token: int) -> tuple[float, float, float, float]:
        r, c = divmod(token, side)
        return c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h

    def centre(token: int) -> tuple[float, float]:
        x0, y0, x1, y1 = box(token)
        return (x0 + x1) / 2, (y0 + y1) / 2

    pixels = np.asarray(image, dtype=np.float32).copy()
    for token in range(num_tokens):
        x0, y0, x1, y1 = (round(v) for v in box(token))
        region = pixels[y0:y1, x0:x1]
        if assignment[token] < 0:  # pruned: greyed out
            region[:] = 0.25 * region.mean(-1, keepdims=True) + 0.75 * 200
        elif merged[token]:  # merged: tinted with its target's colour
            region[:] = 0.45 * region + 0.55 * np.array(colours[assignment[token]], dtype=np.float32)
    out = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for token in range(num_tokens):  # the grid
        draw.rectangle(box(token), outline=(255, 255, 255))
    targets = set()
    for token in range(num_tokens):
        if merged[token]:
            slot = assignment[token]
            targets.add(slot)
            draw.line([centre(token), centre(index[slot])], fill=colours[slot], width=max(1, scale))
    for slot in targets:  # kept tokens that absorbed others
        draw.rectangle(box(index[slot]), outline=colours[slot], width=max(2, scale + 1))
    return out


def legend(carve: ImageCarve) -> str:
    pruned = int((carve.assignment < 0).sum())
    merged = int(carve.merged.sum())
    return f"kept {carve.index.shape[0]} (clear), merged {merged} (tinted, linked), pruned {pruned} (grey)"


def carve_picture(
    model, processor, image: Image.Image, prompt: str, config: CarveConfig, scale: int = 2
) -> tuple[Image.Image, ImageCarve]:
    """Run one prefill of `prompt` about `image` under `config` and draw what it kept."""
    applied_here = not tokencarve.is_applied(model)
    if applied_here:
        tokencarve.apply(model, config)
    carver = model.tokencarve
    record_hidden = carver.record_hidden
    try:
        with carver.using(config):  # a model that was already patched gets its own config back
            carver.record_hidden = True  # so that an image with nothing to cut (keep >= N) is described too
            inputs = processor(images=[image], text=[chat_prompt(processor, prompt)], return_tensors="pt").to(
                model.device
            )
            with torch.inference_mode():
                model(**inputs)
            carve = carver.last_stats.images[0]
    finally:
        carver.record_hidden = record_hidden
        if applied_here:
            tokencarve.remove(model)
    view = model_view(
        inputs["pixel_values"][0], processor.image_processor.image_mean, processor.image_processor.image_std
    )
    return render(view, carve, scale), carve


def side_by_side(pictures: list[Image.Image], labels: list[str]) -> Image.Image:
    """Pictures in one row, each with its label above it."""
    band = 22
    width, height = sum(p.width for p in pictures) + 8 * (len(pictures) - 1), max(p.height for p in pictures) + band
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw, x = ImageDraw.Draw(strip), 0
    for picture, label in zip(pictures, labels):
        strip.paste(picture, (x, band))
        draw.text((x + 4, 4), label, fill=(0, 0, 0))
        x += picture.width + 8
    return strip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/carve-tiny")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--method", default="tokencarve", help=f"one or several, comma-separated, of {tokencarve.METHODS}")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--scale", type=int, default=2, help="upscale the picture this many times")
    p.add_argument("--out", default="kept.png")
    args = p.parse_args(argv)
    model, processor = load_llava(args.model, device="cpu", dtype="float32")
    image, methods = Image.open(args.image).convert("RGB"), args.method.split(",")
    pictures = []
    for method in methods:
        config = CarveConfig(keep=args.keep, layer=args.layer, method=method)  # checks the method's name
        picture, carve = carve_picture(model, processor, image, args.prompt, config, args.scale)
        pictures.append(picture)
        print(f"{method}: {legend(carve)}")
    labels = [f"{m}, {args.keep} tokens" for m in methods]
    (pictures[0] if len(pictures) == 1 else side_by_side(pictures, labels)).save(args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
