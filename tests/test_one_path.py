"""One engine path: the batch job's CPU stage, the Serve handler and the evaluation harness turn the
same non-square images into the same pixels and the same answers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.job import CaptionJob
from pipeline.prepare import prepare_unit
from pipeline.sources import plan_units
from tests.bad_images import encode, gradient
from tokencarve.engine import CaptionEngine, EngineConfig
from tokencarve.eval.questions import Question
from tokencarve.eval.runner import Evaluator, Setting
from tokencarve.images import decode_image

SIZES = [(276, 336), (336, 200), (90, 400), (500, 120)]


def test_batch_serve_and_eval_see_the_same_pixels_and_answer_the_same(tiny_model_dir, tmp_path):
    data = [encode(gradient(w, h).rotate(15 * i, expand=True), "PNG") for i, (w, h) in enumerate(SIZES)]
    prompts = ["What is in the image ?", None, "Describe the image .", None]
    config = EngineConfig(model=tiny_model_dir, keep=32, max_new_tokens=6)
    engine = CaptionEngine(config)

    # the batch job's CPU stage, as its tasks run it (no Ray needed to call it)
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"id": [str(i) for i in range(len(data))], "image": data, "prompt": prompts}),
        tmp_path / "in" / "shard.parquet",
    )
    job = CaptionJob(
        inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), engine=config, batch_size=8, run_id="r"
    )
    rows = [r for block in prepare_unit(plan_units(job.inputs)[0], job) for r in block.to_pylist() if not r["unit_end"]]
    batch_images = [Image.frombytes("RGB", (r["width"], r["height"]), r["pixels"]) for r in rows]
    # Serve's handler: decode the request's bytes, hand the image to the engine
    serve_images = [engine.inputs.image(decode_image(d)) for d in data]
    # the evaluation harness: questions decoded per batch, through the engine
    questions = [Question(str(i), d, p, "", "caption") for i, (d, p) in enumerate(zip(data, prompts))]
    eval_images = [engine.inputs.image(q.image) for q in questions]

    assert all(image.size == (336, 336) for image in batch_images)  # LLaVA-1.5's pad: nothing cropped
    for a, b, c in zip(batch_images, serve_images, eval_images):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    pixels = [
        engine.processor(images=images, text=["USER: <image>\nx ASSISTANT:"] * 4, return_tensors="pt")["pixel_values"]
        for images in (batch_images, serve_images, eval_images)
    ]
    assert (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()

    from_batch = [c.caption for c in engine.caption(batch_images, prompts)]
    from_serve = [c.caption for c in engine.caption([decode_image(d) for d in data], prompts)]
    answered, _ = Evaluator(engine, batch_size=4).answer(questions, Setting(engine.config.method, 32))
    from_eval = [c.caption for c in answered]
    assert from_batch == from_serve == from_eval
