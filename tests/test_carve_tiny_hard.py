"""carve-tiny-hard's scenes (`--scenes hard`), its architecture and its warm start (offline, CPU)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

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

from carve_tiny import data, model, scenes, train

ROOT = Path(__file__).resolve().parents[1]
SIMPLE_MODEL = ROOT / "models" / "carve-tiny"


def hard_scenes(count, seed=0):
    rng = random.Random(seed)
    return [scenes.random_scene(rng, variant="hard") for _ in range(count)]


def test_hard_scenes_span_one_to_nine_objects_of_three_sizes():
    drawn = hard_scenes(3000)
    counts = Counter(len(s.things) for s in drawn)
    assert set(counts) == set(range(1, 10))
    assert {t.size for s in drawn for t in s.things} == {"small", "medium", "large"}
    for scene in drawn:
        cells = [t.cell for t in scene.things] + ([scene.text_cell] if scene.text else [])
        assert len(cells) == len(set(cells)) and scene.variant == "hard"  # one thing per cell
    assert not any(s.text for s in drawn if len(s.things) == 9)  # the text needs a free cell


def test_hard_objects_cover_up_to_a_few_dozen_patches():
    """Per object, the patches it covers (>= 15 % of a patch, the probe's rule): one for a small one,
    tens for a large one."""
    rng = random.Random(1)
    covered = {size: [] for size in scenes.VARIANTS["hard"].sizes}
    for scene in hard_scenes(60, seed=2):
        _, mask = scenes.render(scene, rng, with_masks=True)
        targets = train.patch_targets(scene, mask, "objects")
        anchors = targets[:, train.COLUMN["anchor"]]
        # objects sit in distinct cells, so the object cell column tells objects apart
        for thing in scene.things:
            cell = targets[:, train.COLUMN["cell"]] == thing.cell + 1
            size = targets[:, train.COLUMN["size"]] == 1 + scenes.VARIANTS["hard"].sizes.index(thing.size)
            covered[thing.size].append(int((cell & size).sum()))
        assert int(anchors.sum()) == len(scene.things)  # one anchor per object: counting still works
    assert max(covered["small"]) <= 2 and 3 <= np.median(covered["medium"]) <= 6
    assert 10 <= np.median(covered["large"]) and max(covered["large"]) <= 36


def test_hard_backgrounds_are_textured_and_objects_keep_their_colour():
    rng = random.Random(3)
    scene = scenes.Scene((scenes.Thing("square", "red", "large", 4),), variant="hard", background=(230, 230, 220))
    image, mask = scenes.render(scene, rng, with_masks=True)
    image, mask = np.asarray(image, dtype=np.float32), np.asarray(mask)
    corner = image[:100, :100]  # background only
    assert corner.std(axis=(0, 1)).min() > 2.0  # texture and noise, not a flat fill
    square = image[mask == 1]  # the object's pixels: its colour plus the sensor noise
    assert len(square) > 50 * 50 and np.abs(square.mean(0) - np.array(scenes.COLOURS["red"])).max() < 3
    flat = np.asarray(scenes.render(scenes.Scene(scene.things), random.Random(3)), dtype=np.float32)
    assert flat[:100, :100].std(axis=(0, 1)).max() == 0.0  # simple scenes stay flat


def test_hard_corpus_cli_and_simple_default_unchanged(tmp_path):
    data.main(["--scenes", "hard", "--rows", "12", "--seed", "5", "--out", str(tmp_path / "hard")])
    data.main(["--rows", "12", "--seed", "5", "--out", str(tmp_path / "simple")])
    hard = pq.read_table(tmp_path / "hard" / "shard-00000.parquet").to_pylist()
    simple = pq.read_table(tmp_path / "simple" / "shard-00000.parquet").to_pylist()
    assert [r["task"] for r in hard] == [r["task"] for r in simple]  # round-robin tasks either way
    assert [r["image"] for r in hard] != [r["image"] for r in simple]
    assert simple == list(data.rows(12, seed=5))  # the default is the simple variant
    assert Image.open(io.BytesIO(hard[0]["image"])).size == (336, 336)
    captions = [r["answer"] for r in data.rows(60, seed=6, tasks=("caption",), scenes="hard")]
    assert any("medium" in c for c in captions) and max(c.count(",") for c in captions) >= 5
    with pytest.raises(ValueError, match="unknown scene variant"):
        scenes.random_scene(random.Random(0), variant="photo")


def test_hard_vocabulary_and_depth():
    simple, hard = model.build_tokenizer("simple"), model.build_tokenizer("hard")
    assert "medium" in hard.get_vocab() and "medium" not in simple.get_vocab()
    assert set(simple.get_vocab()) < set(hard.get_vocab())
    config = model.build_config(len(hard), model.DECODER_LAYERS["hard"])
    assert config.text_config.num_hidden_layers == 8 >= 8  # the cut before layer 2 is at a quarter of the depth
    phrase = "top left medium red circle, center large blue star"
    assert hard.decode(hard(phrase, add_special_tokens=False)["input_ids"]) == phrase


@pytest.mark.slow  # loads and grows the bundled model
def test_warm_start_grows_carve_tiny_without_changing_what_it_computes(tmp_path):
    """carve-tiny-hard starts from carve-tiny: shared weights copied, token rows matched by token, the
    four new decoder layers identity blocks; so before any training the grown model gives the same
    logits as carve-tiny for any prompt without the new word (token ids mapped)."""
    from transformers import LlavaForConditionalGeneration

    grown, processor = model.build_untrained(seed=0, scenes="hard")
    copied = train.warm_start(grown, processor.tokenizer, SIMPLE_MODEL)
    assert copied >= 90
    source = LlavaForConditionalGeneration.from_pretrained(SIMPLE_MODEL).eval()
    grown.eval()
    image = scenes.render(scenes.Scene((scenes.Thing("star", "blue", "large", 0),)), random.Random(0))
    text = "USER: <image>\nWhere is the blue star? ASSISTANT:"
    old_inputs = model.build_processor("simple")(text=[text], images=[image], return_tensors="pt")
    new_inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        old_logits = source(**old_inputs).logits[0, -1]
        new_logits = grown(**new_inputs).logits[0, -1]
    old_vocab, new_vocab = model.build_tokenizer("simple").get_vocab(), processor.tokenizer.get_vocab()
    shared = [t for t in old_vocab if t in new_vocab]
    torch.testing.assert_close(
        new_logits[[new_vocab[t] for t in shared]], old_logits[[old_vocab[t] for t in shared]], rtol=1e-4, atol=1e-4
    )
    record_path = tmp_path / "run"
    train.main(
        [
            "--scenes",
            "hard",
            "--init-from",
            str(SIMPLE_MODEL),
            "--out",
            str(record_path),
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--threads",
            "1",
            "--device",
            "cpu",
        ]
    )
    record = json.loads((record_path / "training.json").read_text())
    assert (record["scenes"], record["decoder_layers"], record["init_from"]) == ("hard", 8, str(SIMPLE_MODEL))


@pytest.fixture(scope="module")
def hard_model():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = ROOT / "models" / "carve-tiny-hard"
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.mark.slow  # 60 generations on an 8-layer model
def test_bundled_hard_model_answers_fresh_hard_questions_and_fails_blind(hard_model):
    from carve_tiny import evaluate

    llava, processor = hard_model
    assert llava.config.text_config.num_hidden_layers == 8
    questions = evaluate.question_set(seed=77, per_task=5, scenes="hard")  # a seed no run trained on
    prompts = [q["prompt"] for q in questions]
    vanilla = evaluate.generate_answers(llava, processor, [q["image"] for q in questions], prompts, batch_size=10)
    blank = evaluate.generate_answers(llava, processor, evaluate.control_images(questions, "blank"), prompts, 10)
    vanilla_accuracy = evaluate.accuracy(questions, vanilla)["overall"]
    assert vanilla_accuracy >= 0.9, list(zip(vanilla, [q["answer"] for q in questions]))
    assert evaluate.accuracy(questions, blank)["overall"] <= 0.4
    assert max(len(q["scene"].things) for q in questions if q["task"] == "caption") >= 5  # long captions too
