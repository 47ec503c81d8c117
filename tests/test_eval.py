"""The evaluation harness: scoring on known answers, the question readers, the information measure,
an end-to-end run (two methods x two budgets) on the bundled model, and the token-grid picture."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokencarve
from tokencarve import CarveConfig
from tokencarve.eval import __main__ as cli
from tokencarve.eval import questions as question_files
from tokencarve.eval import report, runner, scoring
from tokencarve.loading import chat_prompt
from tokencarve.visualize import carve_picture, legend

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "carve-tiny"
SAMPLE = ROOT / "data" / "sample"


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "prediction,answer,right",
    [
        ("Top left.", "top left", True),
        (
            "top left large red circle , center small blue square",
            "top left large red circle, center small blue square",
            True,
        ),
        ("top", "top left", False),
        ("4 2", "42", False),
        ("42", "42", True),
        ("Yes, there is a red star.", "yes", True),
        ("No, there is not.", "no", True),
        ("There is no green star in the image.", "no", True),
        ("I do not see one", "no", True),
        ("yes", "no", False),
        ("Nope", "no", False),  # only the words "no" / "not" say no, as in LLaVA's eval_pope.py
    ],
)
def test_answers_are_scored_by_the_documented_rules(prediction, answer, right):
    assert scoring.correct(prediction, answer) is right


def test_yes_no_metrics_match_hand_counts():
    # 3 true positives, 1 false positive, 2 true negatives, 2 false negatives
    pairs = [("yes", "yes")] * 3 + [("Yes.", "no")] + [("no", "no")] * 2 + [("No.", "yes")] * 2
    m = scoring.yes_no_metrics(pairs)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35) and m["yes_ratio"] == pytest.approx(4 / 8)
    assert scoring.yes_no_metrics([("no", "no")])["f1"] == 0.0  # no positives at all: F1 defined as 0


def test_summary_per_task_and_overall():
    records = [
        dict(task="colour", prediction="red", answer="red"),
        dict(task="colour", prediction="blue", answer="red"),
        dict(task="exist", prediction="yes", answer="yes"),
        dict(task="exist", prediction="no", answer="yes"),
        dict(task="exist", prediction="no", answer="no"),
        dict(task="ocr", prediction="cat", answer="cat"),
    ]
    summary = scoring.summarize(records)
    assert summary["tasks"] == {"colour": 0.5, "exist": pytest.approx(2 / 3), "ocr": 1.0}
    assert summary["overall"] == pytest.approx(4 / 6) and summary["questions"] == 6
    assert set(summary["yes_no"]) == {"exist"} and summary["yes_no"]["exist"]["recall"] == 0.5


# ---------------------------------------------------------------- grid, spectrum, readers


def test_grid_runs_the_stock_model_once_and_every_method_at_every_smaller_budget():
    grid = runner.settings(["none", "tokencarve", "fastv"], [576, 128, 16], 576)
    assert [s.name for s in grid] == ["none", "tokencarve@128", "tokencarve@16", "fastv@128", "fastv@16"]
    assert [s.name for s in runner.settings(["pool"], [64], 576)] == ["pool@64"]
    with pytest.raises(ValueError, match="unknown method"):
        runner.settings(["magic"], [64], 576)


def test_effective_rank_of_known_spectra():
    assert runner.spectrum(torch.eye(7, 32))["effective_rank"] == pytest.approx(7)  # 7 equal singular values
    rank_one = torch.outer(torch.arange(1.0, 11.0), torch.ones(16))
    assert runner.spectrum(rank_one)["effective_rank"] == pytest.approx(1, abs=1e-6)
    assert runner.spectrum(3 * torch.eye(4))["nuclear_norm"] == pytest.approx(12)


def test_llava_jsonl_question_files(tmp_path):
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (20, 30), colour).save(tmp_path / name)
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"question_id": 1, "image": "a.png", "text": "Is it red?", "category": "adversarial"})
        + "\n"
        + json.dumps({"question_id": 2, "image": "b.png", "text": "What colour?"})
        + "\n"
    )
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"question_id": 1, "label": "yes"})
        + "\n"
        + json.dumps({"question_id": 2, "answers": ["blue", "navy"]})
        + "\n"
    )
    qs = question_files.read_llava_jsonl(tmp_path / "q.jsonl", tmp_path / "a.jsonl", tmp_path)
    assert [(q.question_id, q.prompt, q.answer, q.task) for q in qs] == [
        ("1", "Is it red?", "yes", "adversarial"),
        ("2", "What colour?", "blue", "vqa"),
    ]
    assert qs[1].image.getpixel((0, 0)) == (0, 0, 255)
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": 1, "label": "yes"}) + "\n")
    with pytest.raises(ValueError, match="no answer"):
        question_files.read_llava_jsonl(tmp_path / "q.jsonl", tmp_path / "a.jsonl", tmp_path)


# ---------------------------------------------------------------- end to end on the bundled model (`bundled`: conftest.py)


def test_harness_end_to_end_two_methods_two_budgets(tmp_path):
    out = tmp_path / "eval"
    result = cli.main(
        [
            "--model",
            str(MODEL),
            "--data",
            str(SAMPLE),
            "--limit",
            "6",
            "--methods",
            "tokencarve,fastv",
            "--budgets",
            "64,16",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    names = [runner.Setting(**r["setting"]).name for r in result["results"]]
    assert names == ["tokencarve@64", "tokencarve@16", "fastv@64", "fastv@16"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in saved["results"]] == [r["setting"] for r in result["results"]]
    assert saved["run"]["device"] == "cpu"  # "auto" resolved and recorded as what ran
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 * 6 and {p["metadata"]["keep"] for p in predictions} == {64, 16}
    for r in result["results"]:
        info, keep = r["summary"]["information"], r["setting"]["keep"]
        assert info["visual_tokens"] == keep and 1 <= info["effective_rank"] <= keep
        assert r["summary"]["questions"] == 6 and 0 <= r["summary"]["overall"] <= 1
    for name in ("accuracy.png", "information.png"):
        assert Image.open(out / name).size[0] > 400
    assert "| tokencarve |" in (out / "table.md").read_text()


@torch.inference_mode()
def plain_answers(model, processor, questions, batch_size: int, max_new_tokens: int) -> list[str]:
    """The unpatched model through the plain processor + generate path (the sample's images are
    already square, so no preprocessing choice is involved)."""
    processor.tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        texts = [chat_prompt(processor, q.prompt) for q in batch]
        inputs = processor(images=[q.image for q in batch], text=texts, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += [
            a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    return answers


def test_the_harness_stock_setting_is_the_stock_model(bundled):
    """The "none" setting (the engine, TokenCarve applied with keep=None) answers exactly as the
    unpatched model does through the plain processor + generate path."""
    from tokencarve.engine import CaptionEngine, EngineConfig

    model, processor = bundled
    qs = question_files.read_parquet(SAMPLE, limit=6)
    stock = plain_answers(model, processor, qs, batch_size=3, max_new_tokens=12)
    engine = CaptionEngine(
        EngineConfig(model="carve-tiny", method="none", max_new_tokens=12), model=model, processor=processor
    )
    try:
        result = runner.Evaluator(engine, batch_size=3).run(qs, runner.Setting("none", None))
    finally:
        engine.close()
    assert [r["prediction"] for r in result["records"]] == stock
    assert result["summary"]["information"]["visual_tokens"] == 576


def test_an_engine_over_a_callers_model_leaves_it_as_given(bundled):
    """close() takes the engine's timing hooks and its carve off the caller's model (a model outlives
    the engines made over it: carve_tiny.evaluate makes one per call); a carve the caller put on
    stays."""
    from tokencarve.engine import CaptionEngine, EngineConfig

    model, processor = bundled
    image = question_files.read_parquet(SAMPLE, limit=1)[0].image
    before = len(model._forward_hooks), len(model._forward_pre_hooks)
    config = EngineConfig(model="carve-tiny", keep=64, max_new_tokens=4)
    for _ in range(3):
        engine = CaptionEngine(config, model=model, processor=processor)
        assert tokencarve.is_applied(model)
        assert engine.caption([image], ["Describe the image."])[0].visual_tokens_kept == 64
        engine.close()
        assert not tokencarve.is_applied(model)
        assert (len(model._forward_hooks), len(model._forward_pre_hooks)) == before
    tokencarve.apply(model, CarveConfig(keep=32))
    try:
        CaptionEngine(config, model=model, processor=processor).close()
        assert tokencarve.is_applied(model) and (len(model._forward_hooks), len(model._forward_pre_hooks)) == before
    finally:
        tokencarve.remove(model)


@pytest.mark.parametrize("method", ["tokencarve", "pool"])
def test_token_grid_picture(bundled, method):
    model, processor = bundled
    image = question_files.read_parquet(SAMPLE, limit=1)[0].image
    picture, carve = carve_picture(model, processor, image, "Describe the image.", CarveConfig(keep=64, method=method))
    assert not tokencarve.is_applied(model)  # applied for the picture only
    assert picture.size == (672, 672)
    pruned, merged = int((carve.assignment < 0).sum()), int(carve.merged.sum())
    assert carve.index.shape[0] == 64 and 64 + merged + pruned == 576
    assert legend(carve) == f"kept 64 (clear), merged {merged} (tinted, linked), pruned {pruned} (grey)"
    pixels = np.asarray(picture, dtype=np.int32)
    if method == "pool":
        assert pruned == 0  # pooling merges every token into its window
    else:
        token = int((carve.assignment < 0).nonzero()[0])
        r, c = divmod(token, 24)
        cell = pixels[r * 28 + 3 : r * 28 + 25, c * 28 + 3 : c * 28 + 25]
        assert (np.ptp(cell, axis=-1) <= 2).all() and (cell >= 150).all()  # grey
        kept = int(carve.index[0])
        r, c = divmod(kept, 24)
        view = np.asarray(image.resize((672, 672), Image.NEAREST), dtype=np.int32)
        inner = (slice(r * 28 + 4, r * 28 + 24), slice(c * 28 + 4, c * 28 + 24))
        assert np.abs(pixels[inner] - view[inner]).max() <= 2  # kept cells are shown as they are


def test_visualize_cli_draws_several_methods_side_by_side(tmp_path, capsys):
    from tokencarve import visualize

    image = question_files.read_parquet(SAMPLE, limit=1)[0].image
    image.save(tmp_path / "scene.png")
    out = tmp_path / "kept.png"
    visualize.main(
        ["--image", str(tmp_path / "scene.png"), "--keep", "32", "--method", "tokencarve,volume", "--out", str(out)]
    )
    strip = Image.open(out)
    assert strip.size == (2 * 672 + 8, 672 + 22)  # two pictures and their labels
    printed = capsys.readouterr().out
    assert "tokencarve: kept 32" in printed and "volume: kept 32 (clear), merged 0" in printed
    with pytest.raises(ValueError, match="method must be one of"):
        visualize.main(["--image", str(tmp_path / "scene.png"), "--method", "magic", "--out", str(out)])


def test_retention_table_compares_with_the_stock_model_and_the_best_reference():
    def result(method, keep, overall, caption, colour):
        tasks = {"caption": caption, "colour": colour}
        return {"setting": {"method": method, "keep": keep}, "summary": {"overall": overall, "tasks": tasks}}

    results = [
        result("none", 576, 0.9, 1.0, 0.8),
        result("tokencarve", 64, 0.6, 0.3, 0.9),
        result("information", 64, 0.7, 0.8, 0.6),
        result("volume", 64, 0.855, 0.95, 0.8),
    ]
    lines = report.retention_table(results).splitlines()
    assert (
        lines[2] == "| tokencarve | 64 | 66.7 | 30.0 | caption +50.0 |"
    )  # information's captions are 50 points better
    assert lines[4] == "| volume | 64 | 95.0 | 95.0 | colour +10.0 |"  # tokencarve's colour is 10 points better
    assert report.retention_table(results[1:]) == "(no uncompressed run to compare with)"
