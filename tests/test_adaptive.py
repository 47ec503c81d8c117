"""Adaptive budgets (issue 26): each image keeps the first k picks that span a share tau of its centred
energy, clamped and rounded, with tau calibrated to a mean. The stopping rule against a slow
definition, clamping, calibration, refusals, the written form everywhere a budget is read, batch
invariance (core, adapter, engine) and the summary's and metrics' figures. No Ray, no training: quick."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

import tokencarve
from pipeline import calibration
from pipeline.job import CaptionJob
from pipeline.output import OUTPUT_FIELDS, Output, Totals
from pipeline.serve_settings import ServeSettings
from pipeline.summary import quantile, summarize
from tokencarve import methods, selection
from tokencarve.budgets import Adaptive, budget_label, parse_budget, split_budgets
from tokencarve.engine import CaptionEngine, EngineConfig
from tokencarve.eval import report, runner
from tokencarve.eval.__main__ import parse_args as eval_args
from tokencarve.selection import Stopping

from .test_job_settings import load_job_module
from .test_selection import brute_force_pivots
from .tiny_llava import CUT, PROMPTS, batch, single

N, D = 240, 48


def varied_images(count: int = 6, seed: int = 0) -> torch.Tensor:
    """[count, N, D] rows of scenes with 1 to 2 x count objects (more objects: more energy outside a
    few picks), on a noisy background: images that should keep different numbers of tokens."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(D, generator=generator) * 3 + 0.05 * torch.randn(count, N, D, generator=generator)
    for b in range(count):
        for _ in range(1 + 2 * b):
            span = torch.randperm(N, generator=generator)[: 1 + int(torch.randint(8, (1,), generator=generator))]
            hidden[b, span] += torch.randn(D, generator=generator) * 2
    return hidden


def slow_shares(rows: torch.Tensor, picks: int) -> list[float]:
    """The share of the centred energy the first 1..picks greedy-volume picks span, by explicit
    projection onto their span (QR of the picked rows)."""
    centred = (rows - rows.mean(0)).double()
    order = brute_force_pivots(centred @ centred.T, picks)
    total = float(centred.square().sum())
    shares = []
    for k in range(1, picks + 1):
        basis, _ = torch.linalg.qr(centred[order[:k]].T)
        outside = centred - centred @ basis @ basis.T
        shares.append(1 - float(outside.square().sum()) / total)
    return shares


def slow_count(shares: list[float], tau: float, low: int, high: int, multiple: int) -> int:
    """The rule as the issue states it: the first k reaching tau, clamped to [low, high], rounded up."""
    first = next((k for k, share in enumerate(shares, start=1) if share >= tau), high + 1)
    return min(high, max(low, -(-first // multiple) * multiple))


def test_the_stopping_rule_is_the_first_k_that_spans_tau_of_the_energy():
    hidden = varied_images()
    high = 24  # < D: every pick within the rows' rank, where the projection is exact
    shares = [slow_shares(hidden[b], high) for b in range(len(hidden))]
    _, curve, _ = selection.adaptive_pivots(selection.volume_gram(hidden), Stopping(None, 1, high, 1))
    # the library's Gram is of float32 rows (as the volume pick's): shares agree to float32's precision
    torch.testing.assert_close(curve, torch.tensor(shares, dtype=torch.float64), atol=1e-5, rtol=0)
    # taus halfway between consecutive shares of some image, where they are further apart than that
    taus = sorted({(s[k] + s[k + 1]) / 2 for s in shares for k in range(high - 1) if s[k + 1] - s[k] > 1e-3})
    assert len(taus) > 20
    for tau in taus:
        for low, multiple in ((1, 1), (8, 8), (4, 4)):
            rule = Stopping(tau, low, high, multiple)
            order, _, counts = selection.adaptive_pivots(selection.volume_gram(hidden), rule)
            expected = [slow_count(s, tau, low, high, multiple) for s in shares]
            assert counts.tolist() == expected, (tau, low, multiple)
            assert order.shape[1] >= max(expected)  # every image's picks were made
    spread = [
        len(set(selection.adaptive_pivots(selection.volume_gram(hidden), Stopping(t, 1, high, 1))[2].tolist()))
        for t in taus
    ]
    assert max(spread) > 2  # the images do keep different numbers


def test_counts_are_clamped_and_rounded_up_to_the_multiple():
    # shares of three images after 1..6 picks (the curve's length is the rule's high here)
    shares = torch.tensor(
        [[0.5, 0.95, 0.99, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4, 0.91, 0.999], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]
    )
    assert selection.adaptive_counts(shares, Stopping(0.9, 1, 6, 1)).tolist() == [2, 5, 6]  # never: high
    assert selection.adaptive_counts(shares, Stopping(0.9, 1, 6, 2)).tolist() == [2, 6, 6]  # 5 -> 6
    assert selection.adaptive_counts(shares, Stopping(0.9, 4, 6, 2)).tolist() == [4, 6, 6]  # 2 -> min
    assert selection.adaptive_counts(shares, Stopping(None, 2, 6, 2)).tolist() == [6, 6, 6]  # calibration pass
    budget = Adaptive(mean=24, min=8, max=40, tau=0.99)
    result = methods.reduce_tokens(varied_images(), torch.zeros(6, N), budget, method="volume")
    assert set(result.counts.tolist()) <= {8, 16, 24, 32, 40}


def test_calibration_hits_the_mean_as_closely_as_the_sample_allows():
    hidden = varied_images(count=8, seed=1)
    budget = Adaptive(mean=20, min=4, max=40, multiple=4)
    sample = methods.reduce_tokens(hidden, torch.zeros(8, N), budget, method="volume")  # tau None: a calibration pass
    assert sample.counts.tolist() == [40] * 8 and sample.shares.shape == (8, 40)
    calibrated = budget.calibrated(sample.shares)
    counts = methods.reduce_tokens(hidden, torch.zeros(8, N), calibrated, method="volume").counts

    def mean_at(tau):
        return float(
            selection.adaptive_counts(sample.shares, dataclasses.replace(budget, tau=tau).rule).double().mean()
        )

    best = min(abs(mean_at(float(t)) - budget.mean) for t in sample.shares.unique())  # every step of the function
    assert abs(float(counts.double().mean()) - budget.mean) == pytest.approx(best)
    assert float(counts.double().mean()) == pytest.approx(mean_at(calibrated.tau))
    # tau sits strictly between two shares: no image is on the boundary
    assert not (sample.shares == calibrated.tau).any()


@pytest.mark.parametrize("method", methods.ADAPTIVE)
def test_adaptive_results_are_padded_and_batch_invariant(method):
    hidden = varied_images(count=5, seed=2)
    attention = torch.rand(5, N, generator=torch.Generator().manual_seed(3)).softmax(-1)
    sample = methods.reduce_tokens(hidden, attention, Adaptive(mean=24, min=8, max=64), method=method)
    budget = Adaptive(mean=24, min=8, max=64).calibrated(sample.shares)
    together = methods.reduce_tokens(hidden, attention, budget, method=method)
    width = int(together.counts.max())
    assert together.index.shape == (5, width) and together.hidden.shape == (5, width, D)
    for b in range(5):
        count = int(together.counts[b])
        real = together.index[b, :count]
        assert (real.diff() > 0).all() and (together.index[b, count:] == -1).all()
        assert (together.hidden[b, count:] == 0).all()
        assert together.assignment[b].max() == count - 1  # no token is carried by a padding slot
        alone = methods.reduce_tokens(hidden[b : b + 1], attention[b : b + 1], budget, method=method)
        assert int(alone.counts[0]) == count and torch.equal(alone.index[0, :count], real)
        torch.testing.assert_close(alone.hidden[0, :count], together.hidden[b, :count])
    # a budget whose max is at least N leaves the images as they are, as keep >= N does
    assert (
        methods.reduce_tokens(hidden, attention, Adaptive(mean=N, min=8, max=N, tau=0.5), method=method).counts is None
    )


def test_volume_merge_keeps_volumes_count_and_merges_within_it():
    hidden = varied_images(count=4, seed=4)
    budget = Adaptive(mean=24, min=8, max=64, tau=0.995)
    volume = methods.reduce_tokens(hidden, torch.zeros(4, N), budget, method="volume")
    merged = methods.reduce_tokens(hidden, torch.zeros(4, N), budget, method="volume-merge")
    assert torch.equal(volume.counts, merged.counts)
    for b, count in enumerate(merged.counts.tolist()):
        assert int(merged.merged[b].sum()) == count // 2  # stage II's M = T / 2 of the image's own T


def test_every_other_method_refuses_an_adaptive_budget():
    budget = Adaptive(tau=0.9)
    for method in set(methods.METHODS) - set(methods.ADAPTIVE):
        with pytest.raises(ValueError, match="not an adaptive budget"):
            tokencarve.CarveConfig(keep=budget, method=method)
        with pytest.raises(ValueError, match="not an adaptive budget"):
            methods.reduce_tokens(varied_images(1), torch.zeros(1, N), budget, method=method)
        with pytest.raises(ValueError, match="not an adaptive budget"):
            EngineConfig(model="m", method=method, keep=budget)
    assert methods.ADAPTIVE == ("volume", "volume-spatial", "volume-merge", "dpp")
    EngineConfig(model="m", method="none", keep=budget)  # the stock model ignores the budget


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(min=12), "multiples of multiple"),
        (dict(mean=8), r"mean must lie in \[min, max\]"),
        (dict(mean=200), "mean must lie"),
        (dict(tau=0.0), "tau must be a float > 0"),
        (dict(multiple=0), "integer >= 1"),
    ],
)
def test_an_adaptive_budget_checks_its_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        Adaptive(**bad)


def test_the_written_form_round_trips_and_is_what_the_job_serve_and_harness_read():
    for text, budget in [
        ("auto:64", Adaptive()),
        ("auto:32,min=8", Adaptive(mean=32, min=8)),
        ("auto:48,min=8,max=128,multiple=4,tau=0.9312", Adaptive(48, 8, 128, 4, 0.9312)),
    ]:
        assert parse_budget(text) == budget and str(budget) == text and parse_budget(str(budget)) == budget
    assert parse_budget(" auto:64 , tau=0.5 ") == Adaptive(tau=0.5) and parse_budget("auto") == Adaptive()
    assert parse_budget("128") == 128 and parse_budget("0.1") == 0.1
    for bad in ("auto:64,tau", "auto:64,foo=1", "auto:64,min=8,min=16", "auto:x", "autumn"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    assert split_budgets("192,64, auto:64,min=8,tau=0.9,32,auto:16") == [
        "192",
        "64",
        "auto:64,min=8,tau=0.9",
        "32",
        "auto:16",
    ]
    assert budget_label(Adaptive(tau=0.5)) == "auto:64,tau=0.5" and budget_label(64) == 64

    job = load_job_module()
    written = "auto:48,min=8,tau=0.9"
    assert job.build_job(job.parse_args(["--keep", written])).engine.keep == Adaptive(48, 8, tau=0.9)
    assert ServeSettings(keep=written).keep == Adaptive(48, 8, tau=0.9)
    assert ServeSettings(**ServeSettings(keep=written).model_dump()).keep == Adaptive(48, 8, tau=0.9)
    with pytest.raises(ValueError, match="needs its tau on Serve"):
        ServeSettings(keep="auto:48")
    harness = eval_args(["--data", "q.parquet", "--budgets", "64,auto:48,min=8,32"])
    grid = runner.settings(["volume", "fastv"], [parse_budget(b) for b in split_budgets(harness.budgets)], 576)
    assert [s.name for s in grid] == ["volume@64", "volume@auto:48,min=8", "volume@32", "fastv@64", "fastv@32"]


# -- through the adapter and the engine (tiny random models) ----------------------------------------------------


def test_the_adapter_keeps_each_images_count_whatever_its_batch_neighbours(carved):
    model = carved(keep=Adaptive(mean=60, min=8, max=192), method="volume")
    inputs = batch()
    inputs["pixel_values"][0] = 0.0  # a flat image: little to keep
    with torch.no_grad(), model.tokencarve.calibrating() as curves:
        model(**inputs)
    budget = Adaptive(mean=60, min=8, max=192).calibrated(torch.cat(curves))
    with model.tokencarve.using(tokencarve.CarveConfig(keep=budget, layer=CUT, method="volume")):
        with torch.no_grad():
            together = model(**inputs).logits
        kept = model.tokencarve.last_stats.visual_tokens_kept
        assert len(set(kept)) > 1  # rows of one batch keep different counts
        assert [len(image.index) for image in model.tokencarve.last_stats.images] == kept
        for row in range(len(PROMPTS)):
            with torch.no_grad():
                alone = model(**single(inputs, row)).logits
            assert model.tokencarve.last_stats.visual_tokens_kept == [kept[row]]
            # left padding: every row's last position is its last prompt token (its next-token logits)
            torch.testing.assert_close(alone[0, -1], together[row, -1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="has no tau yet"):
        with torch.no_grad():
            model(**inputs)  # the uncalibrated config is back, outside `calibrating`


def test_the_engine_calibrates_then_captions_each_row_as_alone(tiny_model_dir):
    from PIL import Image

    generator = torch.Generator().manual_seed(5)
    images = [
        Image.fromarray((torch.rand(336, 336, 3, generator=generator) * 255 * (i % 3) / 2).byte().numpy())
        for i in range(6)
    ]
    prompts = ["Describe the image."] * 6
    engine = CaptionEngine(EngineConfig(model=tiny_model_dir, keep=Adaptive(mean=32, min=8), max_new_tokens=3))
    budget = engine.calibrate(images, prompts)
    assert budget.tau is not None and budget.uncalibrated == Adaptive(mean=32, min=8)
    together = engine.caption(images, prompts, keep=budget)
    assert len({c.visual_tokens_kept for c in together}) > 1
    assert sum(c.visual_tokens_kept for c in together) / 6 == pytest.approx(32, abs=8)
    for image, prompt, caption in zip(images, prompts, together):
        [alone] = engine.caption([image], [prompt], keep=budget)
        assert (alone.visual_tokens_kept, alone.caption) == (caption.visual_tokens_kept, caption.caption)
    with pytest.raises(ValueError, match="has no tau yet"):
        engine.caption(images[:1], prompts[:1])  # the config's own budget is not calibrated


# -- the job's books, the summary, the metrics, the harness's report ---------------------------------------------


def test_a_resumed_job_takes_the_tau_its_output_records(tmp_path):
    def job(keep):
        return CaptionJob(inputs=[], output=str(tmp_path), engine=EngineConfig(model="m", keep=keep))

    fresh = job(Adaptive(mean=48))
    assert calibration.pending(fresh) and calibration.recorded_tau(fresh, Output(str(tmp_path))) == fresh
    Output(str(tmp_path)).claim(job(Adaptive(mean=48, tau=0.93)).settings())
    assert Output(str(tmp_path)).settings()["keep"] == "auto:48,tau=0.93"
    resumed = calibration.recorded_tau(fresh, Output(str(tmp_path)))
    assert resumed.engine.keep == Adaptive(mean=48, tau=0.93) and not calibration.pending(resumed)
    other = job(Adaptive(mean=32))
    assert calibration.recorded_tau(other, Output(str(tmp_path))) == other  # another budget: the claim refuses it


def test_the_summary_reports_the_kept_counts_mean_p50_p95_and_tau(tmp_path):
    assert dict(OUTPUT_FIELDS)["keep"] == pa.string()
    kept = [16] * 10 + [64] * 70 + [128] * 15 + [192] * 5
    table = pa.table(
        {
            "source_row": list(range(101)),
            "error_code": [None] * 100 + ["undecodable_image"],
            "visual_tokens_in": [576] * 100 + [None],
            "visual_tokens_kept": kept + [None],
            "kv_bytes_held": [1] * 101,
            "kv_bytes_uncompressed": [2] * 101,
            "generated_tokens": [3] * 101,
            "correct": [None] * 101,
        }
    )
    half = Totals.of(table.slice(0, 50)).add(Totals.of(table.slice(50)))  # two units' records, summed
    assert half.rows_by_visual_tokens_kept == {"16": 10, "64": 70, "128": 15, "192": 5}
    assert quantile(half.rows_by_visual_tokens_kept, 0.5) == 64 and quantile({}, 0.5) is None
    output = Output(str(tmp_path))
    job = CaptionJob(inputs=[], output=str(tmp_path), engine=EngineConfig(model="m", keep=Adaptive(tau=0.9)))
    output.finish_unit(
        {
            "unit": "u",
            "source": "s",
            "status": "done",
            "error_code": None,
            "error_message": None,
            "rows_read": 101,
            "totals": dataclasses.asdict(half),
            "repeated_ids": 0,
            "repeated_id_examples": [],
        }
    )
    summary = summarize(output, job, units=1, rows_this_run=101, seconds=1.0)
    assert (summary["keep"], summary["tau"]) == ("auto:64,tau=0.9", 0.9)
    assert summary["visual_tokens_kept_mean"] == pytest.approx(sum(kept) / 100)
    assert (summary["visual_tokens_kept_p50"], summary["visual_tokens_kept_p95"]) == (64, 128)


def test_the_metrics_record_each_rows_kept_count():
    import prometheus_client

    from monitoring.dashboards import expressions
    from monitoring.metrics import MetricsRecorder
    from tokencarve.engine import BatchTiming, Caption

    registry = prometheus_client.CollectorRegistry()
    recorder = MetricsRecorder("m", "volume", Adaptive(tau=0.9), backend="prometheus", registry=registry)
    captions = [Caption("x", 576, kept, 1, 2, 3, 10, 0.1) for kept in (16, 64, 64, 136)]
    recorder.batch(captions, BatchTiming(0.1, 0.2, 0.01))
    labels = {"model": "m", "method": "volume", "keep": "auto:64,tau=0.9"}
    value = registry.get_sample_value
    assert value("tokencarve_visual_tokens_kept_per_row_count", labels) == 4
    assert value("tokencarve_visual_tokens_kept_per_row_sum", labels) == 280
    assert value("tokencarve_visual_tokens_kept_per_row_bucket", labels | {"le": "64.0"}) == 3
    assert any("visual_tokens_kept_per_row_bucket" in e and "histogram_quantile(0.95" in e for e in expressions())


def test_the_report_places_adaptive_settings_by_the_mean_they_kept(tmp_path):
    def result(method, keep, overall, mean=None):
        summary = {"overall": overall, "tasks": {"caption": overall}, "yes_no": {}}
        summary["information"] = {"effective_rank": 5.0, "nuclear_norm": 100.0, "visual_tokens": mean or 576}
        if mean is not None:
            summary["mean_visual_tokens_kept"] = mean
        return {"setting": {"method": method, "keep": keep}, "summary": summary}

    results = [
        result("none", None, 0.99),
        result("volume", 64, 0.97, 64),
        result("volume", 32, 0.95, 32),
        result("volume", "auto:64", 0.98, 63.5),
        result("volume", "auto:32", 0.96, 32.25),
    ]
    overall = report.overall_table(results).splitlines()
    assert overall[0] == "| method | 64 tokens | 32 tokens | auto:64 | auto:32 |"
    assert overall[3] == "| volume | 97.0 | 95.0 | 98.0 | 96.0 |"
    assert "| volume | auto:32 (mean 32.2) | 97.0 | 97.0 |  |" in report.retention_table(results)
    assert "| volume | auto:64 (mean 63.5) | 98.0 |" in report.task_table(results)
    report.accuracy_plot(results, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


@pytest.mark.slow  # a real Ray cluster
def test_the_job_calibrates_once_records_tau_and_resumes_with_it(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    import json

    import pyarrow.parquet as pq

    from pipeline.batch import read_output, run

    from .bad_images import encode, gradient

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [{"id": f"r{i}", "image": encode(gradient(60 + 9 * i, 40 + 5 * i), "PNG"), "prompt": None} for i in range(9)]
    pq.write_table(pa.Table.from_pylist(rows[:5]), corpus / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), corpus / "b.parquet")
    engine = EngineConfig(
        model=tiny_model_dir, keep=parse_budget("auto:32,min=8"), max_new_tokens=3, calibration_rows=6
    )
    job = CaptionJob(inputs=[str(corpus)], output=str(tmp_path / "out"), engine=engine, batch_size=4)
    summary = run(job)
    claimed = json.loads((tmp_path / "out" / "_job.json").read_text())["keep"]
    budget = parse_budget(claimed)
    assert budget.uncalibrated == Adaptive(mean=32, min=8) and summary["tau"] == budget.tau is not None
    assert summary["keep"] == claimed and summary["rows_ok"] == 9
    table = read_output(str(tmp_path / "out"))
    assert set(table.column("keep").to_pylist()) == {claimed}  # every row says which budget, tau included
    kept = table.column("visual_tokens_kept").to_pylist()
    assert summary["visual_tokens_kept_mean"] == pytest.approx(sum(kept) / 9, abs=0.01)
    assert summary["visual_tokens_kept_p95"] == sorted(kept)[-1] and all(k % 8 == 0 for k in kept)

    def no_second_calibration(*args, **kwargs):
        raise AssertionError("a resumed output must take its recorded tau")

    monkeypatch.setattr(calibration._calibrate, "options", no_second_calibration)
    units = tmp_path / "out" / "_units"
    next(units.iterdir()).unlink()  # one unit left unfinished: the rerun re-checks it
    again = run(job)  # the uncalibrated budget again
    assert again["keep"] == claimed and again["units_done"] == 2 and again["rows_ok"] == 9
