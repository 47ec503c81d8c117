"""bench_gpu.py's main path end to end at tiny scale: every decode mode on natural output lengths."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
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
