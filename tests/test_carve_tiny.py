"""carve-tiny: the scene generator, the Parquet corpora and the bundled trained model (offline, CPU, fast)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from carve_tiny import data, evaluate, model, scenes, train
from tokencarve.eval.questions import read_parquet
from tokencarve.eval.scoring import correct

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "carve-tiny"
SAMPLE = ROOT / "data" / "sample"


# ---------------------------------------------------------------- generator and corpora


def test_same_seed_same_bytes_and_different_seed_different_bytes(tmp_path):
    a = data.write_corpus(tmp_path / "a", 14, seed=3, shard_rows=5)
    b = data.write_corpus(tmp_path / "b", 14, seed=3, shard_rows=5)
    c = data.write_corpus(tmp_path / "c", 14, seed=4, shard_rows=5)
    assert [p.name for p in a] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]


def test_sample_corpus_schema_and_images():
    shards = sorted(SAMPLE.glob("*.parquet"))
    assert shards, "data/sample holds the bundled sample corpus"
    tables = [pq.read_table(s) for s in shards]
    for table in tables:
        assert table.schema.equals(data.SCHEMA)
    total = sum(t.num_rows for t in tables)
    assert 200 <= total <= 1000
    rows = [r for t in tables for r in t.to_pylist()]
    assert len({r["id"] for r in rows}) == total
    for row in rows[:12]:
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG" and image.size == (336, 336) and image.mode == "RGB"
        assert row["prompt"] and row["answer"] and row["task"] in scenes.TASKS


def test_sample_corpus_is_the_documented_seed():
    """data/sample is exactly `python -m carve_tiny.data --rows 300 --seed 7 --shard-rows 150` (spot check)."""
    first = pq.read_table(sorted(SAMPLE.glob("*.parquet"))[0]).slice(0, 6).to_pylist()
    assert first == list(data.rows(6, seed=7))


def test_every_task_present_and_existence_balanced():
    rows = [
        r for s in sorted(SAMPLE.glob("*.parquet")) for r in pq.read_table(s, columns=["task", "answer"]).to_pylist()
    ]
    tasks = Counter(r["task"] for r in rows)
    assert set(tasks) == set(scenes.TASKS) and len(set(tasks.values())) == 1  # every task, equally often
    exist = Counter(r["answer"] for r in rows if r["task"] == "exist")
    assert exist["yes"] == exist["no"] == tasks["exist"] // 2
    # the free-running generator (training) flips a fair coin
    rng = random.Random(11)
    answers = Counter(scenes.question(scenes.random_scene(rng), "exist", rng)[1] for _ in range(4000))
    assert abs(answers["yes"] / 4000 - 0.5) < 0.03


def _scene():
    T = scenes.Thing
    things = (
        T("circle", "red", "large", 0),
        T("square", "blue", "small", 4),
        T("circle", "green", "small", 5),
        T("star", "red", "large", 8),
    )
    return scenes.Scene(things, text="42", text_cell=6)


def test_answers_follow_the_scene():
    scene, rng = _scene(), random.Random(0)
    assert scenes.question(scene, "caption", rng) == (
        "Describe the image.",
        "top left large red circle, center small blue square, middle right small green circle, "
        "bottom right large red star",
    )
    assert scenes.question(scene, "ocr", rng) == ("What does the text say?", "42")
    for _ in range(30):
        prompt, answer = scenes.question(scene, "colour", rng)  # circles occur twice: never asked
        assert (prompt, answer) in {("What colour is the square?", "blue"), ("What colour is the star?", "red")}
        prompt, answer = scenes.question(scene, "position", rng)
        expected = {
            "red circle": "top left",
            "blue square": "center",
            "green circle": "middle right",
            "red star": "bottom right",
        }
        assert answer == expected[prompt.removeprefix("Where is the ").removesuffix("?")]
        prompt, answer = scenes.question(scene, "count", rng)
        shape = prompt.removeprefix("How many ").removesuffix("s are there?")
        assert answer == {"circle": "2", "square": "1", "star": "1"}.get(shape, "0")
    assert scenes.question(scene, "exist", rng, exist_yes=False)[1] == "no"
    prompt, answer = scenes.question(scene, "exist", rng, exist_yes=True)
    assert answer == "yes" and prompt in {
        "Is there a red circle?",
        "Is there a blue square?",
        "Is there a green circle?",
        "Is there a red star?",
    }
    with pytest.raises(LookupError):
        scenes.question(scenes.Scene(scene.things), "ocr", rng)


def test_rendering_draws_the_scene():
    image, mask = scenes.render(_scene(), random.Random(0), with_masks=True)
    assert image.size == mask.size == (336, 336)
    assert image == scenes.render(_scene(), random.Random(0))  # the masks do not change the pixels
    pixels, labels = np.asarray(image), np.asarray(mask)
    for k, thing in enumerate(_scene().things):
        ys, xs = np.nonzero(labels == k + 1)
        assert len(ys) > 50
        assert {(int(y) // 112) * 3 + int(x) // 112 for y, x in zip(ys, xs)} == {thing.cell}  # inside its cell
        assert (pixels[ys, xs] == scenes.COLOURS[thing.colour]).all()
    ys, xs = np.nonzero(labels == 255)  # the text box, in the bottom-left cell, with dark ink in it
    assert set((ys // 112) * 3 + xs // 112) == {6} and pixels[ys, xs].min() < 60
    assert (pixels[112:224, 0:112] == _scene().background).all()  # an empty cell


def test_patch_targets_follow_the_mask():
    scene = _scene()
    image, mask = scenes.render(scene, random.Random(0), with_masks=True)
    targets = train.patch_targets(scene, mask)
    assert targets.shape == (576, len(train.PATCH_HEADS))
    shapes = targets[:, train.COLUMN["shape"]]
    assert set(shapes.tolist()) == {0} | {1 + scenes.SHAPES.index(t.shape) for t in scene.things}
    tens, units = (targets[:, train.COLUMN[h]] for h in ("tens", "units"))
    assert set(tens.tolist()) == {0, 1 + 4} and set(units.tolist()) == {0, 1 + 2}  # "42"
    cell = train.COLUMN["cell"]
    rows, cols = torch.arange(576) // 24, torch.arange(576) % 24
    assert torch.equal(targets[:, cell], rows // 8 * 3 + cols // 8)  # every patch: its grid cell


def test_cell_target_objects_labels_only_what_is_there():
    """`--cell-target objects`: the cell head labels object and text patches (1 + cell), the background 0."""
    scene = _scene()
    _, mask = scenes.render(scene, random.Random(0), with_masks=True)
    every, objects = (train.patch_targets(scene, mask, target) for target in train.CELL_TARGETS)
    cell = train.COLUMN["cell"]
    what = [train.COLUMN[h] for h in ("colour", "shape", "size", "word", "tens", "units")]  # the anchor: a subset
    something = (every[:, what] > 0).any(1)
    assert something.any() and not something.all()
    assert torch.equal(objects[:, cell], torch.where(something, every[:, cell] + 1, 0))
    assert set(objects[something, cell].tolist()) == {1 + t.cell for t in scene.things} | {1 + scene.text_cell}
    for target in train.CELL_TARGETS:  # the probe's head sizes match the targets
        probe = train.PatchProbe(16, target)
        features = torch.randn(1, 576, 16)
        labels = train.patch_targets(scene, mask, target)[None]
        assert torch.isfinite(probe.loss(features, labels)) and set(probe.accuracy(features, labels)) >= {"cell"}
    with pytest.raises(ValueError, match="cell target"):
        train.patch_heads("some")


@pytest.mark.slow  # trains (two short runs)
def test_training_is_a_function_of_the_seed(tmp_path):
    """Two short runs of the training CLI with the bundled recipe's defaults and the same seed save
    identical weights; the saved folder loads through the public API and records the recipe."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    for name in ("a", "b"):
        train.main(
            ["--out", str(tmp_path / name), "--steps", "2", "--batch-size", "2", "--threads", "1", "--device", "cpu"]
        )
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert (record["cell_target"], record["precision"], record["steps"]) == ("objects", "bfloat16", 2)
    assert isinstance(LlavaForConditionalGeneration.from_pretrained(tmp_path / "a"), LlavaForConditionalGeneration)


def test_score_normalisation():
    assert correct(" Top left. ", "top left")
    assert correct(
        "top left large red circle , center small blue square", "top left large red circle, center small blue square"
    )
    assert correct("YES", "yes")
    assert not correct("top", "top left")
    assert not correct("4 2", "42")


# ---------------------------------------------------------------- tokenizer, processor and prompt (`bundled`: conftest.py)


def test_tokenizer_round_trips_answers(bundled):
    _, processor = bundled
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(tok("42 57", add_special_tokens=False)["input_ids"]) == ["4", "##2", "5", "##7"]
    for text in ["42", "top left large red circle, center small blue square", "yes", "hat"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (model.PAD, model.BOS, model.EOS)
    assert tok.convert_tokens_to_ids("<image>") == model.IMAGE


def test_training_rows_are_the_inference_prompt(bundled):
    """Each training branch is token for token what the processor makes of TEMPLATE at inference."""
    _, processor = bundled
    row = train.training_row(train.Encoder(processor.tokenizer), random.Random(2))
    assert set(row.tasks) >= {"caption", "colour", "count", "exist", "position"}
    for k, task in enumerate(row.tasks, start=1):
        own = [i for i, b in enumerate(row.branch) if b in (0, k)]
        answer_at = next(i for i in own if row.labels[i] != train.IGNORE)
        question_ids = [row.ids[i] for i in own if row.branch[i] == k and i < answer_at]
        assert processor.tokenizer.convert_ids_to_tokens(question_ids[-2:]) == ["ASSISTANT", ":"]
        prompt = processor.tokenizer.decode(question_ids[:-2])
        expected = processor(images=[row.image], text=[model.TEMPLATE.format(prompt=prompt)])["input_ids"][0]
        assert [row.ids[i] for i in own if i < answer_at] == list(expected)
        assert row.labels[own[-1]] == model.EOS


def test_branches_equal_separate_single_turn_forwards(bundled):
    """The training batch layout (shared image prefix, masked branches) computes exactly what one
    single-turn forward per question computes."""
    llava, processor = bundled
    row = train.training_row(train.Encoder(processor.tokenizer), random.Random(3))
    batch = train.collate([row])
    with torch.no_grad():
        logits = llava(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        for k in (1, len(row.tasks)):
            own = [i for i, b in enumerate(row.branch) if b in (0, k)]
            single = llava(
                input_ids=torch.tensor([[row.ids[i] for i in own]]), pixel_values=batch["pixel_values"]
            ).logits[0]
            assert torch.allclose(single, logits[own], atol=1e-4)


def test_bundled_model_is_llava_1_5_shaped(bundled):
    llava, processor = bundled
    config = llava.config
    assert config.model_type == "llava" and config.vision_config.model_type == "clip_vision_model"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert config.vision_feature_select_strategy == "default" and config.image_token_id == model.IMAGE
    assert config.text_config.model_type == "llama" and config.text_config.num_hidden_layers >= 4
    assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)
    assert processor.vision_feature_select_strategy == "default"
    generation = llava.generation_config
    assert (generation.eos_token_id, generation.pad_token_id) == (model.EOS, model.PAD) and generation.max_new_tokens
    assert (MODEL / "model.safetensors").stat().st_size < 25 * 2**20
    assert json.loads((MODEL / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]


def test_processor_gives_576_image_tokens_per_image(bundled):
    llava, processor = bundled
    images = [scenes.render(_scene(), random.Random(i)) for i in range(2)]
    inputs = processor(
        images=images,
        text=[
            model.TEMPLATE.format(prompt="Describe the image."),
            model.TEMPLATE.format(prompt="What colour is the square?"),
        ],
        return_tensors="pt",
        padding=True,
    )
    assert (inputs["input_ids"] == model.IMAGE).sum(1).tolist() == [576, 576]
    with torch.no_grad():
        features = llava.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert [tuple(f.shape) for f in features] == [(576, llava.config.text_config.hidden_size)] * 2
    assert torch.allclose(inputs["pixel_values"], model.pixel_values(images))  # training skips the processor


# ---------------------------------------------------------------- the trained model really looks


def test_bundled_model_answers_the_sample_and_fails_blind(bundled):
    llava, processor = bundled
    questions = [
        dict(vars(q), image=q.image, scene=None) for q in read_parquet(SAMPLE, limit=30)
    ]  # 5 rows of each task
    prompts = [q["prompt"] for q in questions]
    vanilla = evaluate.generate_answers(llava, processor, [q["image"] for q in questions], prompts, batch_size=8)
    blank = evaluate.generate_answers(
        llava, processor, evaluate.control_images(questions, "blank"), prompts, batch_size=8
    )
    assert processor.tokenizer.padding_side == "left"
    vanilla_accuracy = evaluate.accuracy(questions, vanilla)["overall"]
    blank_accuracy = evaluate.accuracy(questions, blank)["overall"]
    assert vanilla_accuracy >= 0.9, list(zip(vanilla, [q["answer"] for q in questions]))
    assert blank_accuracy <= 0.4 and blank_accuracy <= vanilla_accuracy - 0.4
