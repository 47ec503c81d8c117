"""The Ray layer: a batch captioning pipeline (Ray Data) and a serving app, on one engine.

- `pipeline.engine`:  `CaptionEngine` loads a LLaVA once, applies TokenCarve, captions in batches.
- `pipeline.images`:  decode and validate untrusted image bytes (shared by batch and serve).
- `pipeline.sources`: read Parquet / image folders / WebDataset into one schema.
- `pipeline.batch`:   the Ray Data job behind `jobs/caption_corpus.py`.
"""
