"""carve-tiny: a small, genuinely trained LLaVA-architecture model and the scene generator it learns from.

- `carve_tiny.scenes`:   seeded scenes, questions and answers, rendered with Pillow
- `carve_tiny.data`:     write corpora as Parquet shards (`python -m carve_tiny.data`)
- `carve_tiny.model`:    architecture, tokenizer and processor (llava-hf format)
- `carve_tiny.train`:    reproducible training (`python -m carve_tiny.train`)
- `carve_tiny.evaluate`: per-task accuracy with blank / shuffled image controls
"""
