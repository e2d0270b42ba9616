"""Checkpoints: every rank's training state into one Ray Train checkpoint, restore, and consolidation.

Layout of a checkpoint folder `<run>/checkpoint_<step>` (Ray merges the ranks' folders into it):
  deepspeed/        DeepSpeed `save_checkpoint` output (tag `state`): model, optimizer, scheduler
  ema/rank_<r>.pt   EMA (rank 0 only for ZeRO 0; every rank's partition under ZeRO 1-3)
  data/rank_<r>.pt  SequenceStream.state_dict() of rank r
  rng/rank_<r>.pt   torch / numpy / python RNG states of rank r
  meta.json         step, world size, ZeRO stage, last loss, MLflow run id (rank 0)
  config.yaml       the resolved Config (rank 0)
  ranks/rank_<r>.json  the files rank r wrote, with sizes: a checkpoint is complete (visible to
                    `latest_checkpoint`) only when every rank's list is present and every file has
                    its size, so a crash during an upload never yields a half checkpoint.
Ray Train itself registers a checkpoint only after all ranks reported it, and `get_checkpoint()`
resumes from registered ones. Every file, ours and DeepSpeed's, loads with weights_only=True.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .safe_load import safe_checkpoint_engine, safe_load, weights_only_zero_to_fp32

DS_TAG = "state"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:09d}"


def checkpoint_step(checkpoint_url: str) -> int:
    """The step of a checkpoint folder named by `checkpoint_dir_name` (.../checkpoint_000000400)."""
    return int(checkpoint_url.rstrip("/").rsplit("_", 1)[-1])


# ---------------------------------------------------------------- hashing and RNG

def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names and fp32 values: equal iff the weights are bitwise equal in fp32."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """All RNG states of this process as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save / restore (inside workers)

def save_state(folder: str | Path, *, engine, ema, stream, rank: int, world_size: int,
               meta: dict[str, Any] | None, config_yaml: str | None) -> None:
    """Write this rank's part of a checkpoint into local `folder` (every rank calls it)."""
    folder = Path(folder)
    engine.save_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)
    for sub in ("ema", "data", "rng", "ranks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if ema.partitioned or rank == 0:
        torch.save(ema.state_dict(), folder / "ema" / f"rank_{rank}.pt")
    torch.save(stream.state_dict(), folder / "data" / f"rank_{rank}.pt")
    torch.save(rng_state(), folder / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        (folder / "meta.json").write_text(json.dumps({**(meta or {}), "world_size": world_size}, indent=1))
        (folder / "config.yaml").write_text(config_yaml or "")
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.parent != folder / "ranks"}
    (folder / "ranks" / f"rank_{rank}.json").write_text(json.dumps({"rank": rank, "files": files}))


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_state(folder: str | Path, *, engine, ema, stream, rank: int) -> dict[str, Any]:
    """Load this rank's state from a local checkpoint folder; returns meta.json."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    safe_checkpoint_engine(engine)
    load_path, _ = engine.load_checkpoint(str(folder / "deepspeed"), tag=DS_TAG,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{folder}/deepspeed: DeepSpeed found no checkpoint with tag {DS_TAG!r}")
    ema.load_state_dict(_load(folder / "ema" / f"rank_{rank if ema.partitioned else 0}.pt"))
    stream.load_state_dict(_load(folder / "data" / f"rank_{rank}.pt"))
    set_rng_state(_load(folder / "rng" / f"rank_{rank}.pt"))
    return meta


# ---------------------------------------------------------------- reading checkpoints from storage

def _fs(url: str, storage_options: dict | None):
    from arflow_scale.data.storage import filesystem

    return filesystem(url, storage_options)


def _read_json(fs, path: str) -> Any:
    with fs.open(path, "r") as f:
        return json.load(f)


def is_complete(checkpoint_url: str, storage_options: dict | None = None) -> bool:
    """True when meta.json and every rank's file list are present with all files at their sizes."""
    fs, path = _fs(checkpoint_url, storage_options)
    path = path.rstrip("/")
    fs.invalidate_cache(path)
    try:
        meta = _read_json(fs, f"{path}/meta.json")
        for rank in range(int(meta["world_size"])):
            listing = _read_json(fs, f"{path}/ranks/rank_{rank}.json")
            for rel, size in listing["files"].items():
                if fs.size(f"{path}/{rel}") != size:
                    return False
    except (FileNotFoundError, NotADirectoryError, KeyError, ValueError):
        return False
    return True


def list_checkpoints(run_url: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the checkpoint folders under `run_url`, oldest first (complete or not)."""
    fs, path = _fs(run_url, storage_options)
    fs.invalidate_cache()  # object-store listings are cached per filesystem instance
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path.rstrip("/"), detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [f"{run_url.rstrip('/')}/{n}" for n in sorted(n for n in names if re.fullmatch(r"checkpoint_\d+", n))]


def latest_checkpoint(run_url: str, storage_options: dict | None = None) -> str | None:
    """URL of the newest complete checkpoint under the run folder `run_url`, or None."""
    for url in reversed(list_checkpoints(run_url, storage_options)):
        if is_complete(url, storage_options):
            return url
    return None


def check_resume_world_size(run_url: str, storage_options: dict | None, world_size: int) -> None:
    """A run continues from its latest checkpoint only with the number of workers that wrote it (ZeRO
    optimizer partitions, EMA partitions and data-stream positions are per rank): else a ConfigError
    before any worker starts, rather than DeepSpeed failing inside every worker."""
    from arflow_scale.config.base import check

    latest = latest_checkpoint(run_url, storage_options)
    if latest is None:
        return
    fs, path = _fs(latest, storage_options)
    written = int(_read_json(fs, f"{path.rstrip('/')}/meta.json")["world_size"])
    check(written == world_size, "cluster.num_workers",
          f"{world_size}, but run {run_url} continues from {latest}, written by {written} workers; resume "
          f"with cluster.num_workers={written} or start a new run.name")


def resolve_checkpoint(url: str, storage_options: dict | None = None) -> str:
    """A checkpoint folder URL, or a run folder URL (-> its latest complete checkpoint)."""
    fs, path = _fs(url, storage_options)
    if fs.exists(f"{path.rstrip('/')}/meta.json"):
        if not is_complete(url, storage_options):
            raise ValueError(f"{url}: checkpoint is incomplete (a rank's files are missing)")
        return url.rstrip("/")
    latest = latest_checkpoint(url, storage_options)
    if latest is None:
        raise FileNotFoundError(f"{url}: neither a checkpoint (no meta.json) nor a run folder with one")
    return latest


def read_meta(checkpoint_url: str, storage_options: dict | None = None):
    """(meta dict, resolved Config) of a checkpoint."""
    import yaml

    from arflow_scale.config import config_from_dict
    from arflow_scale.config.base import drop_masked

    fs, path = _fs(checkpoint_url, storage_options)
    meta = _read_json(fs, f"{path.rstrip('/')}/meta.json")
    with fs.open(f"{path.rstrip('/')}/config.yaml", "r") as f:
        cfg = config_from_dict(drop_masked(yaml.safe_load(f.read()) or {}))
    return meta, cfg


def load_ema_weights(checkpoint_url: str, storage_options: dict | None = None):
    """(Config, consolidated fp32 EMA state_dict) of a checkpoint (or a run's latest), any ZeRO stage."""
    from arflow_scale.train.ema import consolidate

    checkpoint_url = resolve_checkpoint(checkpoint_url, storage_options)
    meta, cfg = read_meta(checkpoint_url, storage_options)
    fs, path = _fs(checkpoint_url, storage_options)
    ranks = range(int(meta["world_size"])) if meta.get("ema_partitioned") else [0]
    states = []
    for rank in ranks:
        with fs.open(f"{path.rstrip('/')}/ema/rank_{rank}.pt", "rb") as f:
            states.append(torch.load(f, map_location="cpu", weights_only=True))
    if states[0]["partitioned"]:
        starts = [s["starts"] for s in states] if "starts" in states[0] else None  # older: ZeRO-3 only
        return cfg, consolidate([s["shadow"] for s in states], states[0]["meta"], starts)
    return cfg, {name: t.clone() for name, t in states[0]["shadow"].items()}


def zero0_fp32_weights(states: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """A ZeRO-0 DeepSpeed model-states file -> fp32 weights: the optimizer's fp32 masters when it kept
    them (bf16 training: `fp32_groups`, in `param_groups` order), else the module's own weights."""
    from arflow_scale.train.deepspeed_config import group_names

    module = states["module"]
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    if not masters:
        return {k: v.float().clone() for k, v in module.items()}
    names = [n for group, _ in group_names({n: t.ndim for n, t in module.items()}) for n in group]
    tensors = [t for group in masters for t in group]
    if len(names) != len(tensors) or any(module[n].shape != t.shape for n, t in zip(names, tensors)):
        raise ValueError(f"{where}: the fp32 master groups do not match the module's parameters "
                         f"({len(tensors)} tensors for {len(names)} parameters)")
    return {n: t.float().clone() for n, t in zip(names, tensors)}


def load_raw_weights(checkpoint_url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Consolidated fp32 training weights from the DeepSpeed files (zero_to_fp32), any ZeRO stage.

    DeepSpeed's files are read with weights_only=True (see `safe_load`).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_url = resolve_checkpoint(checkpoint_url, storage_options)
    meta, _ = read_meta(checkpoint_url, storage_options)
    fs, path = _fs(checkpoint_url, storage_options)
    with tempfile.TemporaryDirectory(prefix="arflow_ds_") as tmp:
        local = os.path.join(tmp, "deepspeed")
        fs.get(f"{path.rstrip('/')}/deepspeed", local, recursive=True)
        if int(meta["zero_stage"]) == 0:
            states = safe_load(os.path.join(local, DS_TAG, "mp_rank_00_model_states.pt"))
            return zero0_fp32_weights(states, checkpoint_url)
        with weights_only_zero_to_fp32():
            state = get_fp32_state_dict_from_zero_checkpoint(local, tag=DS_TAG)
        return {k: v.float().clone() for k, v in state.items()}
