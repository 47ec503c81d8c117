"""The Ray layer: a batch captioning pipeline (Ray Data) and a serving app, on one engine
(`tokencarve.engine.CaptionEngine`; images are validated by `tokencarve.images`).

- `pipeline.sources`: corpora as units (shards), read into one schema whatever the shard looks like.
- `pipeline.output`:  the output's layout, per-shard records and totals.
- `pipeline.batch`:   the Ray Data job behind `jobs/caption_corpus.py`.
- `pipeline.serve`:   the Ray Serve app.
"""
