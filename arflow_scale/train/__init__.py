"""Distributed training: the Ray Train driver (`train.driver.train`), one Trainer per rank (DeepSpeed engine,
EMA, stream), the write side of checkpoints, fault injection and the console a user watches.

Importing this package imports nothing heavy: the engine, EMA, state and schedule modules work without Ray,
MLflow or webdataset (tools/gpu_check.py and tools/gpu_bench.py run on machines without them).
"""
