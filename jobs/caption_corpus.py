"""Caption (or answer prompts over) an image corpus with a TokenCarve-patched LLaVA on Ray; write Parquet.

    python jobs/caption_corpus.py                       # the bundled model and sample corpus, local Ray
    ray job submit --working-dir . -- python jobs/caption_corpus.py --input s3://bucket/corpus \\
        --output s3://bucket/captions --model llava-hf/llava-1.5-7b-hf --num-gpus 1 --max-actors 8

Inputs: Parquet shards (id or key; image bytes, jpg, or image_path; optional prompt and reference answer;
img2dataset's layout works as it is), folders of images, WebDataset .tar shards. Output: one Parquet row per
input row (caption, or error_code + error_message; source_file + source_row; carried columns as source_<name>)
plus _summary.json. A rerun into the same output resumes: finished shards are skipped, unfinished ones
re-checked. A hub id is pinned to one revision (the output's, else the hub's current commit) for every load.

Exit status:
  0  done (rows whose generation failed are error rows; a block whose worker keeps faulting is retried
     --block-attempts times, then its rows are worker_failed error rows; unreadable shards are skipped
     and listed in the summary, and a rerun retries them)
  2  refused before anything is claimed or captioned: the output holds another setting (model, method,
     budget, generation, --carry, ...; runtime-only ones such as --decode, --decode-slots or
     --compile-decode never refuse a resume), or the engine refuses the setting (generation settings,
     model family, method, budget): `error: <why>` on stderr
  3  with --strict: some shard could not be read (the rest is written)
  4  stopped by a systemic failure: more than --max-failure-share of the last --failure-window rows an
     actor captioned failed generation (a broken compile, a bad setting, not the rows); the first error
     and the count on stderr. The units of those rows are not recorded done: fix the cause and submit the
     same command again, and their rows are captioned (one row per input row, as ever)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout or a Ray working_dir without installing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402

from monitoring.push import push_summary  # noqa: E402
from pipeline import calibration  # noqa: E402
from pipeline.batch import CaptionJob, pin_revision, preflight, run  # noqa: E402
from pipeline.faults import SystemicFailure  # noqa: E402
from pipeline.output import Output, SettingsMismatch  # noqa: E402
from pipeline.sources import FORMATS  # noqa: E402
from tokencarve.settings import (  # noqa: E402
    add_engine_arguments,
    claim_defaults,
    engine_config_from_args,
    upgrade_claim,
)

DEFAULT_MODEL = ROOT / "models" / "carve-tiny"
DEFAULT_INPUT = ROOT / "data" / "sample"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", help=f"corpus path or URI, repeatable (default: {DEFAULT_INPUT})")
    p.add_argument("--input-format", choices=FORMATS, default="auto")
    p.add_argument(
        "--carry",
        default="",
        help="source columns to copy to the output as source_<name>, comma-separated "
        "(e.g. url,caption,key,json; in WebDataset: member suffixes, key, caption = .txt, or .json fields)",
    )
    p.add_argument("--output", default="out/captions", help="output folder or URI (default: %(default)s)")
    add_engine_arguments(p, model_default=str(DEFAULT_MODEL))  # --model, --keep, --method, --max-new-tokens, ...
    p.add_argument("--no-carve", action="store_true", help="run the stock model (same as --method none)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per engine call (a block); default: 8 x the decode slots (128 on a CPU, 512 on a GPU), "
        "so that finished rows' slots refill",
    )
    p.add_argument("--min-actors", type=int, default=1)
    p.add_argument("--max-actors", type=int, default=1)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (0 on CPU machines)")
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=CaptionJob.rows_per_file,
        help="rows per written bundle; a part file holds one shard's share of it",
    )
    p.add_argument(
        "--block-attempts",
        type=int,
        default=CaptionJob.block_attempts,
        help="attempts at a block whose actor faults (out of memory, lost device, died) before its rows "
        "become worker_failed error rows (default: %(default)s)",
    )
    p.add_argument(
        "--failure-window",
        type=int,
        default=CaptionJob.failure_window,
        help="rows per actor the systemic-failure stop looks back over (default: %(default)s)",
    )
    p.add_argument(
        "--max-failure-share",
        type=float,
        default=CaptionJob.failure_share,
        help="stop the job (exit status 4) when more than this share of an actor's last --failure-window rows "
        "failed generation; 1: never (default: %(default)s)",
    )
    p.add_argument("--max-image-bytes", type=int, default=CaptionJob.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=CaptionJob.max_image_pixels)
    p.add_argument(
        "--address",
        default=None,
        help="Ray address ('auto': a running local cluster; default: the job's cluster, else a new local one)",
    )
    p.add_argument(
        "--pushgateway", default=None, help="push the run summary to this Prometheus Pushgateway (host:port)"
    )
    p.add_argument(
        "--progress-every",
        type=float,
        default=CaptionJob.progress_every_s,
        help="seconds between progress lines on stderr (0: none; default: %(default)s)",
    )
    p.add_argument(
        "--strict", action="store_true", help="exit 3 when any shard could not be read (after writing the rest)"
    )
    return p.parse_args(argv)


def build_job(args: argparse.Namespace) -> CaptionJob:
    engine = engine_config_from_args(args, **({"method": "none"} if args.no_carve else {}))
    return CaptionJob(
        inputs=args.input or [str(DEFAULT_INPUT)],
        output=args.output,
        engine=engine,
        input_format=args.input_format,
        carry=tuple(c.strip() for c in args.carry.split(",") if c.strip()),
        batch_size=args.batch_size,
        min_actors=args.min_actors,
        max_actors=args.max_actors,
        num_gpus=args.num_gpus,
        actor_cpus=args.actor_cpus,
        rows_per_file=args.rows_per_file,
        block_attempts=args.block_attempts,
        failure_window=args.failure_window,
        failure_share=args.max_failure_share,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        progress_every_s=args.progress_every,
    )


def ray_address(requested: str | None) -> str:
    """--address, else the cluster `ray job submit` runs us on (RAY_ADDRESS), else a new local Ray.
    ("local" rather than None: None would try a stale cluster left in /tmp/ray by an earlier head.)"""
    return requested or os.environ.get("RAY_ADDRESS") or "local"


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Output(args.output)
    job = pin_revision(calibration.recorded_tau(build_job(args), output), output)
    try:
        # before starting Ray: a setting the engine refuses, or a mismatched output, is refused at once
        # (a new output whose adaptive budget still needs its tau is claimed by run(), once calibrated)
        preflight(job.engine)
        if not calibration.pending(job) or output.settings() is not None:
            output.claim(job.settings(), claim_defaults(), upgrade_claim)
    except (SettingsMismatch, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ray.init(address=ray_address(args.address), log_to_driver=False)
    try:
        summary = run(job)
    except SystemicFailure as stop:
        print(
            f"error: the job stopped: {stop}\nThe shards holding those rows are not recorded done: fix the cause "
            "and submit the same command again; their rows are captioned then",
            file=sys.stderr,
        )
        return 4
    summary.pop("ray_data_stats")  # it is in the summary file; the console gets the figures
    if args.pushgateway:
        push_summary(summary, args.pushgateway)
    print(json.dumps(summary, indent=2))
    for shard in summary["failed_shards"]:
        print(f"failed shard: {shard['source']}: {shard['error_code']}: {shard['error_message']}", file=sys.stderr)
    if summary["rows_worker_failed"]:
        print(
            f"warning: {summary['rows_worker_failed']:,} rows are worker_failed error rows: their blocks failed "
            f"on every one of {job.block_attempts} attempts (see their error_message)",
            file=sys.stderr,
        )
    return 3 if args.strict and summary["units_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
