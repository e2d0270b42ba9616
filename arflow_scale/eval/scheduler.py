"""FID while a training run goes on: the driver polls the run folder for complete checkpoints at multiples of
`eval.fid_every` (and the final one with `eval.fid_at_end`) and launches the FID graph for each."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, wait
from typing import Any, Callable, Optional, TypeVar

import ray

from arflow_scale.checkpoint import checkpoint_step, is_complete, list_checkpoints
from arflow_scale.config import Config

from .graph import PinnedEMA, launch_fid

log = logging.getLogger(__name__)
T = TypeVar("T")


class FidScheduler:
    """Launches `launch_fid` for every complete FID checkpoint while training runs; the tasks log `fid` to the
    run. The driver owns the refs, so the tasks outlive the training workers, and on a small cluster they run
    once the workers release their CPUs. A FID that cannot be launched is recorded for its step, never raised."""

    def __init__(self, cfg: Config, run_url: str, storage_options: dict, tracking_uri: Optional[str],
                 run_id: Optional[str], poll_seconds: float = 10.0):
        self.cfg, self.run_url, self.options = cfg, run_url, storage_options
        self.tracking_uri, self.run_id, self.poll_seconds = tracking_uri, run_id, poll_seconds
        self.refs: dict[int, Any] = {}
        self.failed: dict[int, str] = {}  # step -> why its FID could not be launched

    def _launch(self, checkpoint_url: str, step: int) -> None:
        if step in self.refs or step in self.failed:
            return
        try:
            # the weights are pinned now: keep_last may delete the checkpoint before the tasks run
            loader = PinnedEMA.of(checkpoint_url, self.options)
            self.refs[step] = launch_fid(checkpoint_url, self.cfg, step, self.tracking_uri, self.run_id,
                                         model_loader=loader)
            log.info("FID of %s (step %d) launched", checkpoint_url, step)
        except Exception as err:  # noqa: BLE001 - a FID problem must not fail the training run
            log.warning("FID of %s (step %d) could not be launched: %s", checkpoint_url, step, err)
            self.failed[step] = f"{type(err).__name__}: {err}"

    def poll(self) -> None:
        """Launch the FID of every new complete checkpoint at a multiple of eval.fid_every."""
        every = self.cfg.eval.fid_every
        if not every:
            return
        for url in list_checkpoints(self.run_url, self.options):
            step = checkpoint_step(url)
            new = step not in self.refs and step not in self.failed
            if step % every == 0 and new and is_complete(url, self.options):
                self._launch(url, step)

    def run_while_polling(self, fit: Callable[[], T], on_tick: Optional[Callable[[], None]] = None,
                          tick_seconds: float = 1.0) -> T:
        """Run `fit()` (blocking) in a daemon thread; meanwhile call `on_tick` (the driver's console) every tick and
        poll for FID checkpoints every `poll_seconds`. An exception in this thread (KeyboardInterrupt: a user
        stopping the run at once) leaves without waiting for `fit`: leaving the Ray session ends it."""
        tick = min(tick_seconds, self.poll_seconds)
        last_poll = time.monotonic()
        future: Future = Future()
        threading.Thread(target=_run_into, args=(fit, future), name="arflow-fit", daemon=True).start()
        while not wait([future], timeout=tick).done:
            if on_tick is not None:
                on_tick()
            if time.monotonic() - last_poll >= self.poll_seconds:
                self.poll()
                last_poll = time.monotonic()
        result = future.result()
        self.poll()
        if on_tick is not None:
            on_tick()
        return result

    def finish(self, final_checkpoint: Optional[str]) -> dict[str, Any]:
        """Launch the end-of-training FID if configured, wait for all; {step: {"fid", "n", "seconds"} or {"error"}}."""
        if self.cfg.eval.fid_at_end and final_checkpoint:
            self._launch(final_checkpoint, checkpoint_step(final_checkpoint))
        results: dict[str, Any] = {str(step): {"error": why} for step, why in self.failed.items()}
        for step, ref in sorted(self.refs.items()):
            try:
                results[str(step)] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a failed evaluation must not lose a finished run
                log.warning("FID at step %s failed: %s", step, err)
                results[str(step)] = {"error": f"{type(err).__name__}: {err}"}
        return dict(sorted(results.items(), key=lambda item: int(item[0])))


def _run_into(fit: Callable[[], T], future: Future) -> None:
    """`fit()`'s result or exception into `future`."""
    try:
        future.set_result(fit())
    except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
        future.set_exception(err)
