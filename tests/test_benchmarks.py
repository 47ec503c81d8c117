"""The benchmarks' main paths end to end at tiny scale: bench_gpu.py (every decode mode on natural output
lengths) and bench_decode.py's random LLaVA-1.5 model (every decode path and budget, per-row caps)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_bench(name: str = "bench_gpu"):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_every_decode(tmp_path):
    bench = load_bench()
    out = tmp_path / "gpu.json"
    argv = ["--scale", "tiny", "--batches", "2", "--blocks", "2", "--budgets", "stock,64", "--method", "volume"]
    argv += ["--prefill-batches", "1", "--repeats", "1", "--lengths", "natural", "--json", str(out)]
    record = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))

    lengths = bench.caption_lengths(4, 64, "natural", 0)
    settings = {(s["decode"], s["method"]): s for s in record["settings"]}
    assert set(settings) == {(d, m) for d in bench.DECODES for m in ("stock", "volume")}
    for (decode, _), s in settings.items():
        assert s["best batch"] == 2 and s["captions/s"] > 0 and s["steps"] > 0
        if decode == "generate":  # each batch runs to its longest row
            assert s["tokens"] == 2 * max(lengths[:2]) + 2 * max(lengths[2:])
        else:  # every row ends exactly at its drawn length (no eos on the random model)
            assert s["lengths exact"] is True and s["tokens"] == sum(lengths)
        for field in ("vs stock generate", "prefill s", "decode s", "carve share of prefill", "decode ms/step"):
            assert field in s
    assert settings["static", "volume"]["carve share of prefill"] > 0
    for field in ("device", "date", "torch", "transformers"):
        assert field in record["environment"]
    assert {"p50", "p95", "mean", "distribution"} <= set(record["lengths"])


def test_bench_decode_random_llava15_tiny(tmp_path):
    """bench_decode's llava-1.5-random model at tiny scale: every path x budget, per-row caps, refill."""
    bench = load_bench("bench_decode")
    out = tmp_path / "decode.json"
    argv = ["--models", "llava-1.5-random", "--llava-scale", "tiny", "--batches", "2", "--llava-rows", "4"]
    argv += ["--llava-repeats", "1", "--max-new-tokens", "24", "--targets", "no", "--compile", "no", "--seed", "3"]
    record = bench.main(argv + ["--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))

    (section,) = record["models"]
    assert section["model"] == "llava-1.5-random" and section["targets"] == []
    settings = {(s["decode"], s["budget"]): s for s in section["settings"]}
    assert set(settings) == {(p, b) for p in bench.PATHS for b in bench.BUDGETS}
    caps = bench.caption_lengths(4, 24, "natural", 3)
    for (path, budget), s in settings.items():
        # the static paths' rows end at their own caps and match generate()'s first tokens
        assert s["same captions"] == "yes" and s["captions/s"] > 0 and s["ms/step"] > 0
        assert s["batch"] == 2 and s["rows"] == 4
        generate_steps = max(caps[:2]) - 1 + max(caps[2:]) - 1
        assert settings["generate", budget]["steps"] == generate_steps
        if path == "static":  # batches of 2, each to its longest row, as generate() runs them
            assert s["steps"] == generate_steps
        if path == "static+refill":  # 2 slots refilled as rows end: never more steps than batches of 2
            assert s["steps"] <= generate_steps and s["steps saved"] == generate_steps - s["steps"]
    assert section["caption_lengths"]["keep 64"] == bench.length_summary(caps)
    assert "llava-1.5-random" in bench.report(record["environment"], record["models"], bench.parse_args(argv))


@pytest.mark.slow  # Qwen2.5-VL's real vocabulary and a 1008 px image through its ViT: about a minute
def test_bench_gpu_tiny_qwen25_vl(tmp_path):
    """--arch qwen2.5-vl (the next GPU session's second model) at tiny scale: a 1008 px image of 1,296
    tokens per prompt, its 3-D positions through the static path, every row at its own length."""
    bench = load_bench()
    argv = ["--arch", "qwen2.5-vl", "--scale", "tiny", "--batches", "2", "--blocks", "1", "--budgets", "stock,128"]
    argv += ["--method", "volume", "--decode", "generate,static", "--prefill-batches", "", "--repeats", "1"]
    record = bench.main(argv)
    assert record["model"]["architecture"] == "Qwen2.5-VL" and record["prompt"]["visual_tokens"] == 1296
    settings = {(s["decode"], s["visual tokens"]): s for s in record["settings"]}
    assert set(settings) == {(d, n) for d in ("generate", "static") for n in (1296, 128)}
    assert all(s["lengths exact"] is True for (d, _), s in settings.items() if d == "static")


def test_adaptive_coverage_counts_picks_until_every_object_is_touched(tmp_path):
    """adaptive_coverage on a few fresh hard scenes: every image needs at least one pick per object
    (and at most the picks made), a fixed budget covers exactly the images that need no more than it,
    and both rules are calibrated to the asked-for mean."""
    bench = load_bench("adaptive_coverage")
    record = bench.main(["--images", "12", "--means", "16,32", "--json", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == json.loads(json.dumps(record))
    needed = record["needed"]
    assert len(needed) == 12 and all(1 <= n <= 192 for n in needed)
    judged = needed[6:]
    for row in record["rows"]:
        covered = float(row["covered"])
        if row["rule"] == "fixed":
            assert covered == pytest.approx(sum(n <= row["mean"] for n in judged) / len(judged), abs=1e-3)
        else:  # counts are multiples of 8 in [16, 192], their mean near the asked one on 6 judged images
            assert 16 <= row["count mean"] <= 192 and 0 <= covered <= 1


def test_bench_engine_scale_tiny_runs_every_default_and_every_row_to_its_length(tmp_path):
    """The GPU script's first step (the engine's default path at scale), at tiny scale on the CPU: the
    defaults' pool within its budget, every row exactly its drawn length, nothing fell back to eager."""
    bench = load_bench("bench_engine_scale")
    out = tmp_path / "scale.json"
    figures = bench.main(["--scale", "tiny", "--rows", "40", "--keep", "64", "--json", str(out)])
    assert json.loads(out.read_text())["figures"] == json.loads(json.dumps(figures))
    assert figures["every row its length"] is True and figures["eager fallbacks"] == 0
    assert figures["rows per call"] == 8 * figures["slots"] == 128 and figures["captions/s"] > 0
    assert 0 < figures["pool GiB"] <= figures["budget GiB"]
