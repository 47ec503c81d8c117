"""carve-tiny-qwen: native-size corpora, the Qwen2.5-VL-architecture model, its training layout (offline, CPU)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import io
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from carve_tiny import data, scenes


def _digest(rows) -> str:
    h = hashlib.sha256()
    for r in rows:
        for key in ("id", "image", "prompt", "answer", "task"):
            h.update(r[key] if isinstance(r[key], bytes) else r[key].encode())
    return h.hexdigest()


def test_default_corpora_are_byte_identical_to_before_native_sizes():
    """Digests taken before `--sizes` existed (24 rows, seed 11): the 336 x 336 path is unchanged."""
    assert _digest(data.rows(24, seed=11)) == "fcaa2b732c8a650f75c9ead92874cca60b5642934d9309ca2b2ea2263b81dbfb"
    assert (
        _digest(data.rows(24, seed=11, scenes="hard"))
        == "70491ea311c86ff12571668083f5812b73eb05bb22dee17f1bae7eb5b83a757b"
    )


def test_native_sizes_keep_answers_and_vary_the_image(tmp_path):
    data.main(["--scenes", "hard", "--sizes", "224-448", "--rows", "36", "--seed", "5", "--out", str(tmp_path)])
    sized = pq.read_table(tmp_path / "shard-00000.parquet").to_pylist()
    plain = list(data.rows(36, seed=5, scenes="hard"))
    for key in ("id", "prompt", "answer", "task"):  # the size draws nothing from the scenes' stream
        assert [r[key] for r in sized] == [r[key] for r in plain]
    dims = [Image.open(io.BytesIO(r["image"])).size for r in sized]
    assert all(224 <= side <= 448 and side % 28 == 0 for size in dims for side in size)
    assert len(set(dims)) > 10 and any(w > h for w, h in dims) and any(w < h for w, h in dims)
    tokens = [(w // 28) * (h // 28) for w, h in dims]  # Qwen2.5-VL: one token per 28 x 28 px
    assert 64 <= min(tokens) < max(tokens) <= 256
    assert sized == list(data.rows(36, seed=5, scenes="hard", sizes=(224, 448)))  # seeded
    with pytest.raises(ValueError, match="multiples of 28"):
        scenes.parse_sizes("200-448")


@pytest.mark.parametrize("size", [(224, 448), (448, 224), (336, 336), (252, 392), (224, 224)])
def test_native_render_keeps_objects_in_their_cell_on_the_patch_grid_at_their_size(size):
    """Rendered at the size, not resized: every object inside its cell of the 3 x 3 grid of that image,
    in its exact colour, at its 336-px size (a large one at most 2 px smaller in the smallest cells)
    and on the 14-px patch grid as at 336 (centred on a patch corner, a small one on a patch centre),
    so that a patch shows what it shows at 336 whatever the image's size."""
    rng = random.Random(4)
    width, height = size
    radius = scenes.VARIANTS["hard"].radius
    for _ in range(8):
        scene = scenes.random_scene(rng, variant="hard")
        image, mask = scenes.render(scene, rng, with_masks=True, size=size)
        assert image.size == mask.size == size
        pixels, labels = np.asarray(image, dtype=np.float32), np.asarray(mask)
        for k, thing in enumerate(scene.things):
            ys, xs = np.nonzero(labels == k + 1)
            assert len(ys) > 20
            cells = set((3 * ys // height) * 3 + 3 * xs // width)
            assert cells == {thing.cell}
            colour = pixels[ys, xs].mean(0)  # the sensor noise averages out
            assert np.abs(colour - np.array(scenes.COLOURS[thing.colour])).max() < 4
            if thing.shape in ("circle", "diamond"):  # drawn from cx - r to cx + r on both axes
                shift = scenes.PATCH // 2 if thing.size == "small" else 0
                for low, high in ((xs.min(), xs.max()), (ys.min(), ys.max())):
                    assert (low + high) % 2 == 0 and ((low + high) // 2 - shift) % scenes.PATCH == 0
                    assert radius[thing.size] - (2 if thing.size == "large" else 0) <= (high - low) // 2
                    assert (high - low) // 2 <= radius[thing.size]


# ---------------------------------------------------------------- the model and its training layout

import torch  # noqa: E402

from carve_tiny import model, train  # noqa: E402


@pytest.fixture(scope="module")
def untrained_qwen():
    qwen, processor = model.build_untrained_qwen(seed=0)
    with torch.no_grad():  # random q/k/v biases, so that the checks see them
        for layer in qwen.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0.0, 0.3)
    return qwen.eval(), processor


def test_qwen_architecture_and_token_counts(untrained_qwen):
    qwen, processor = untrained_qwen
    config = qwen.config
    assert type(qwen).__name__ == "Qwen2_5_VLForConditionalGeneration"
    text, vision = config.text_config, config.vision_config
    assert text.num_hidden_layers == 8 and text.hidden_size == 128  # the cut before layer 2: a quarter
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.patch_size == 14 and vision.spatial_merge_size == 2
    assert vision.fullatt_block_indexes and len(vision.fullatt_block_indexes) < vision.depth  # windowed + full
    for size, tokens in (((224, 224), 64), ((448, 448), 256), ((224, 448), 128), ((336, 252), 108)):
        image = Image.new("RGB", size, (200, 200, 200))
        out = processor(images=[image], text=["USER: <|vision_start|><|image_pad|><|vision_end|>Hi ASSISTANT:"])
        assert int((out["input_ids"] == config.image_token_id).sum()) == tokens


def test_qwen_training_rows_are_the_inference_prompt(untrained_qwen):
    """Each branch, with the image prefix, is token for token what the processor makes of the chat
    template's prompt for that question and image (native size: token counts vary per row)."""
    from tokencarve.loading import chat_prompt

    qwen, processor = untrained_qwen
    layout = train.qwen_layout(qwen, processor)
    rng, counts = random.Random(2), set()
    for _ in range(3):
        row = train.training_row(train.Encoder(processor.tokenizer), rng, scenes="hard", layout=layout)
        counts.add(row.grid)
        assert len(row.targets) == row.grid[0] * row.grid[1] == row.ids.count(layout.image)
        for k in (1, len(row.tasks)):
            own = [i for i, b in enumerate(row.branch) if b in (0, k)]
            answer_at = next(i for i in own if row.labels[i] != train.IGNORE)
            question_ids = [row.ids[i] for i in own if row.branch[i] == k and i < answer_at]
            prompt = processor.tokenizer.decode(question_ids[:-2])
            expected = processor(images=[row.image], text=[chat_prompt(processor, prompt)])["input_ids"][0]
            assert [row.ids[i] for i in own if i < answer_at] == expected.tolist()
    assert len(counts) > 1


def test_qwen_branches_equal_separate_single_turn_forwards(untrained_qwen):
    """Two rows of different sizes in one batch: every branch's logits equal a separate single-turn
    forward where the model computes its own 3-D positions (get_rope_index)."""
    qwen, processor = untrained_qwen
    layout = train.qwen_layout(qwen, processor)
    rng = random.Random(3)
    rows = [train.training_row(train.Encoder(processor.tokenizer), rng, scenes="hard", layout=layout) for _ in range(2)]
    assert rows[0].grid != rows[1].grid
    batch = train.collate(rows, layout=layout)
    assert batch["position_ids"].shape[0] == 3
    with torch.no_grad():
        logits = qwen(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for i, row in enumerate(rows):
            single_image = layout.pixels([row.image])
            for k in (1, len(row.tasks)):
                own = [j for j, b in enumerate(row.branch) if b in (0, k)]
                ids = torch.tensor([[row.ids[j] for j in own]])
                single = qwen(input_ids=ids, mm_token_type_ids=(ids == layout.image).int(), **single_image).logits[0]
                torch.testing.assert_close(single, logits[i, own], atol=1e-4, rtol=1e-4)


def test_qwen_position_targets_follow_the_objects(untrained_qwen):
    qwen, processor = untrained_qwen
    layout = train.qwen_layout(qwen, processor)
    row = train.training_row(train.Encoder(processor.tokenizer), random.Random(5), scenes="hard", layout=layout)
    tokens, grids = train.position_targets([row])
    assert grids.tolist() == [list(row.grid)]
    cells = row.targets[:, train.COLUMN["cell"]]  # "every-patch": the cell of each token
    where = tokens[:, 0] > 0
    assert where.any() and (where == torch.as_tensor(train.occupied(row.targets))).all()
    rows, cols = tokens[where, 0] - 1, tokens[where, 1] - 1
    assert ((3 * rows // row.grid[0]) * 3 + 3 * cols // row.grid[1] == cells[where]).all()


HARD_MODEL = os.path.join(os.path.dirname(__file__), "..", "models", "carve-tiny-hard")


@pytest.mark.slow  # loads the bundled carve-tiny-hard
def test_warm_start_from_carve_tiny_hard_keeps_the_decoder_on_text_and_the_tower_on_its_features():
    """With carve-tiny-hard's rope_theta, the warm-started Qwen decoder computes what carve-tiny-hard
    computes on text (mRoPE with equal t / h / w positions is 1-D RoPE; the new q/k/v biases start at
    zero); the CLIP tower and projector carried into the Qwen tower and merger (clip_to_qwen_tower)
    give each 2 x 2 group of a 336-px image what the projector gives the mean of those four CLIP
    features, up to what the Qwen tower lacks (absolute positions, LayerNorm's centring of the stream)."""
    from transformers import LlavaForConditionalGeneration

    rope = dict(model.QWEN_ROPE, rope_theta=1e6)
    qwen, processor = model.build_untrained_qwen(seed=0, rope=rope)
    copied = train.warm_start(qwen, processor.tokenizer, HARD_MODEL)
    # decoder: per layer 4 attention, 3 MLP, 2 norms, and the final norm; tower: the patch embedding,
    # 11 tensors per CLIP layer (3 of them), the merger's 5
    assert copied == 8 * 9 + 1 + 1 + 3 * 11 + 5
    source = LlavaForConditionalGeneration.from_pretrained(HARD_MODEL).eval()
    text = "USER: Where is the blue star? ASSISTANT: top left"
    old = model.build_tokenizer("hard")(text, return_tensors="pt")["input_ids"]
    new = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    assert old.tolist() == new.tolist()  # the Qwen tokens come after the shared vocabulary
    with torch.no_grad():
        torch.testing.assert_close(
            qwen.eval()(input_ids=new).logits[..., : source.config.text_config.vocab_size],
            source(input_ids=old).logits,
            atol=1e-4,
            rtol=1e-4,
        )
    rng = random.Random(3)
    images = [scenes.render(scenes.random_scene(rng, variant="hard"), rng) for _ in range(2)]
    with torch.no_grad():
        _, last = train.clip_features(source, images)  # [2, 1 + 576, 96], the class token first
        grid = last[:, 1:].reshape(2, 12, 2, 12, 2, -1).mean((2, 4)).reshape(2 * 144, -1)
        expected = source.model.multi_modal_projector(grid)
        encoded = processor.image_processor(images=images, return_tensors="pt")
        merged = qwen.model.visual(encoded["pixel_values"], grid_thw=encoded["image_grid_thw"]).pooler_output
    assert encoded["image_grid_thw"].tolist() == [[1, 24, 24]] * 2
    similarity = torch.nn.functional.cosine_similarity(merged, expected, dim=-1)
    assert similarity.median() > 0.99 and similarity.mean() > 0.95  # a few object tokens lose more
    untouched = (
        model.build_untrained_qwen(seed=0, rope=rope)[0]
        .model.visual(encoded["pixel_values"], grid_thw=encoded["image_grid_thw"])
        .pooler_output
    )
    assert torch.nn.functional.cosine_similarity(untouched, expected, dim=-1).mean() < 0.5


def test_distillation_rows_pair_the_native_image_with_its_336_twin(untrained_qwen):
    """With a teacher, a row also holds the same scene at 336 x 336 (same objects, moves and texture
    draws; the rows' stream goes on as without) and what each token shows in both; the distillation
    loss is zero when every student token equals the teacher's mean over the patches showing the same."""
    qwen, processor = untrained_qwen
    layout = train.qwen_layout(qwen, processor)
    encode = train.Encoder(processor.tokenizer)
    plain_rng, taught_rng = random.Random(8), random.Random(8)
    plain = train.training_row(encode, plain_rng, scenes="hard", layout=layout)
    row = train.training_row(encode, taught_rng, scenes="hard", layout=layout, teacher=True)
    assert plain_rng.random() == taught_rng.random()  # the twin render draws from a copy
    assert row.ids == plain.ids and row.image == plain.image and row.teacher_image.size == (336, 336)
    objects = int(row.teacher_owner.max())
    assert set(row.owner.tolist()) - {-1} <= set(row.teacher_owner.tolist()) - {-1}
    assert (row.owner >= 0).tolist() == train.occupied(row.targets).tolist()  # patch_targets' rule
    assert len(set(row.teacher_owner.tolist()) - {-1}) >= objects  # every object seen at 336
    teacher = torch.randn(1, 576, 128)
    student = torch.stack(
        [teacher[0, torch.as_tensor(row.teacher_owner == what)].mean(0) for what in row.owner.tolist()]
    )
    assert float(train.distill_loss(student, teacher, [row])) < 1e-10
    assert float(train.distill_loss(student + 1.0, teacher, [row])) > 0.5


ROOT = os.path.join(os.path.dirname(__file__), "..")
QWEN_MODEL = os.path.join(ROOT, "models", "carve-tiny-qwen")
QWEN_SAMPLE = os.path.join(ROOT, "data", "sample-qwen")


def test_native_size_sample_is_the_documented_command():
    """data/sample-qwen is `python -m carve_tiny.data --scenes hard --sizes 224-448 --rows 36 --seed 7
    --shard-rows 18` (the first shard, byte for byte)."""
    shard = pq.read_table(os.path.join(QWEN_SAMPLE, "shard-00000.parquet")).to_pylist()
    assert shard == list(data.rows(36, seed=7, scenes="hard", sizes=(224, 448)))[:18]


@pytest.mark.slow  # loads the bundled model and answers a few questions
def test_bundled_qwen_model_loads_offline_and_answers_through_the_engine():
    from tokencarve import load_llava
    from tokencarve.engine import CaptionEngine, EngineConfig
    from tokencarve.processing import ImageTextProcessor

    qwen, processor = load_llava(QWEN_MODEL, device="cpu", dtype="float32")
    assert type(qwen).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert isinstance(processor, ImageTextProcessor) or type(processor).__name__ == "Qwen2_5_VLProcessor"
    rows = pq.read_table(os.path.join(QWEN_SAMPLE, "shard-00000.parquet")).to_pylist()[:6]
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    engine = CaptionEngine(
        EngineConfig(model=QWEN_MODEL, keep=0.25, max_new_tokens=64), model=qwen, processor=processor
    )
    captions = engine.caption(images, [r["prompt"] for r in rows])
    assert all(c.caption for c in captions)
    for caption, image in zip(captions, images):  # native size: 64-256 tokens, a quarter of them kept
        tokens = (image.width // 28) * (image.height // 28)
        assert caption.visual_tokens_in == tokens and caption.visual_tokens_kept == -(-tokens // 4)
