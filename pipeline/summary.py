"""The whole output's figures, summed over its unit records (streamed: one record in memory at a time),
so a resumed run's summary covers every run into the output."""

from __future__ import annotations

from tokencarve.budgets import Adaptive, budget_label

from .job import CaptionJob
from .output import Output, Totals

EXAMPLES = 5  # repeated ids listed by name (the count is complete)
FAILED_SHARDS_LISTED = 100  # units_failed counts them all


def summarize(output: Output, job: CaptionJob, units: int, rows_this_run: int, seconds: float) -> dict:
    totals, statuses, repeated, examples, failed_shards = Totals(), {"done": 0, "failed": 0}, 0, [], []
    for record in output.records():
        totals.add(Totals.from_dict(record["totals"]))
        statuses[record["status"]] += 1
        repeated += record["repeated_ids"]
        examples += record["repeated_id_examples"][: EXAMPLES - len(examples)]
        if record["status"] == "failed" and len(failed_shards) < FAILED_SHARDS_LISTED:
            failed_shards.append(
                {
                    "source": record["source"],
                    "error_code": record["error_code"],
                    "error_message": record["error_message"],
                }
            )
    t = totals
    budget = job.engine.budget
    return {
        "output": job.output,
        "model": job.engine.model,
        "method": job.engine.method,
        "keep": budget_label(budget),  # adaptive: in its written form, tau included
        "tau": budget.tau if isinstance(budget, Adaptive) else None,
        "rows_total": t.rows,
        "rows_ok": t.rows_ok,
        "rows_failed": t.rows - t.rows_ok,
        "errors_by_reason": dict(sorted(t.errors_by_reason.items())),
        # rows of blocks that kept failing on the workers (out of memory, a lost device, a dying actor)
        "rows_worker_failed": t.errors_by_reason.get("worker_failed", 0),
        "rows_this_run": rows_this_run,
        "rows_skipped_as_done": t.rows - rows_this_run,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_this_run / seconds, 3) if seconds > 0 else None,
        "units_total": units,
        "units_done": statuses["done"],
        "units_failed": statuses["failed"],
        "failed_shards": failed_shards,
        "repeated_ids": repeated,
        "repeated_id_examples": examples,
        "repeated_ids_scope": "within each shard (ids repeated across shards are not counted)",
        "visual_tokens_in": t.visual_tokens_in,
        "visual_tokens_kept": t.visual_tokens_kept,
        "visual_tokens_kept_pct": round(100 * t.visual_tokens_kept / t.visual_tokens_in, 2)
        if t.visual_tokens_in
        else None,
        # per captioned row (one image each in the job's rows): what an adaptive budget spread, a fixed one not
        "visual_tokens_kept_mean": round(t.visual_tokens_kept / t.rows_ok, 2) if t.rows_ok else None,
        "visual_tokens_kept_p50": quantile(t.rows_by_visual_tokens_kept, 0.5),
        "visual_tokens_kept_p95": quantile(t.rows_by_visual_tokens_kept, 0.95),
        "generated_tokens": t.generated_tokens,
        "kv_bytes_held": t.kv_bytes_held,
        "kv_bytes_uncompressed": t.kv_bytes_uncompressed,
        "kv_bytes_saved": t.kv_bytes_uncompressed - t.kv_bytes_held,
        "kv_saved_pct": round(100 * (t.kv_bytes_uncompressed - t.kv_bytes_held) / t.kv_bytes_uncompressed, 2)
        if t.kv_bytes_uncompressed
        else None,
        "rows_with_answers": t.rows_with_answers,
        "accuracy_pct": round(100 * t.rows_correct / t.rows_with_answers, 2) if t.rows_with_answers else None,
    }


def quantile(counts: dict[str, int], q: float) -> int | None:
    """The q-quantile (nearest rank: the smallest value with at least q of the rows at or below it) of
    values given as {value: rows}; None without rows."""
    total = sum(counts.values())
    seen = 0
    for value in sorted(counts, key=int):
        seen += counts[value]
        if seen >= q * total:
            return int(value)
    return None
