"""What a user watching `arflow train` sees: one clean line per log interval (or a progress bar on a
terminal), and one line per checkpoint, resume, warning and FID result. Workers push typed events to a
small Ray actor; the driver drains it and prints. Ray's own worker output stays off unless `-v`.
"""
from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, TextIO, Union

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm


@dataclass(frozen=True)
class StepProgress:
    """Rank 0's numbers at a log interval."""

    step: int
    total: int
    loss: float
    loss_name: str
    lr: float
    images_per_s: float
    data_wait_fraction: float
    eta_seconds: float
    mfu: Optional[float] = None
    world_size: Optional[int] = None  # the ranks training (the console shows it when it changes)


@dataclass(frozen=True)
class Notice:
    """One line worth a user's attention: a checkpoint, a resume, a warning of some rank, a FID result."""

    text: str


Event = Union[StepProgress, Notice]


@ray.remote(num_cpus=0)
class ConsoleSink:
    """Collects the workers' events until the driver drains them; carries the driver's stop request the other
    way (train/stop.py)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.stop = False

    def push(self, event: Event) -> None:
        self.events.append(event)

    def drain(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(p: StepProgress, show_world: bool = False) -> str:
    """`step 120/1200  loss 0.4123  lr 2.00e-03  1234 img/s  data 3%  eta 1m20s` (+ mfu when measured, + `workers
    N` with `show_world`)."""
    parts = [f"step {p.step}/{p.total}", f"{p.loss_name} {p.loss:.4f}", f"lr {p.lr:.2e}",
             f"{p.images_per_s:.0f} img/s", f"data {p.data_wait_fraction:.0%}"]
    if p.mfu is not None:
        parts.append(f"mfu {p.mfu:.1%}")
    parts.append(f"eta {format_seconds(p.eta_seconds)}")
    if show_world and p.world_size is not None:
        parts.append(f"workers {p.world_size}")
    return "  ".join(parts)


class Console:
    """Driver side: prints drained events to `stream` (stderr: stdout's last line is the run's JSON)."""

    def __init__(self, stream: Optional[TextIO] = None, bar: Optional[bool] = None):
        self.stream = stream if stream is not None else sys.stderr  # the stderr of now, not of the first import
        # On the driver's node: workers may lose their nodes (elastic runs), the console must not.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.sink = ConsoleSink.options(scheduling_strategy=here).remote()
        use_bar = self.stream.isatty() if bar is None else bar
        self.bar: Optional[tqdm] = tqdm(file=self.stream, unit="step", dynamic_ncols=True) if use_bar else None
        self.world_size: Optional[int] = None  # of the last progress line

    def show(self, event: Event) -> None:
        if isinstance(event, Notice):
            self.write(event.text)
            return
        resized = event.world_size != self.world_size  # the first line, or the run continues on another size
        line = progress_line(event, show_world=resized)
        self.world_size = event.world_size
        if self.bar is not None:
            self.bar.total = event.total
            self.bar.n = event.step
            self.bar.set_postfix_str(line.split("  ", 1)[1], refresh=True)
        else:
            self.write(line)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def drain(self) -> None:
        """Print everything the workers pushed since the last call."""
        for event in ray.get(self.sink.drain.remote()):
            self.show(event)

    def close(self) -> None:
        self.drain()
        if self.bar is not None:
            self.bar.close()


class SinkHandler(logging.Handler):
    """Forwards a worker's warnings (our loggers and `warnings.warn`) to the driver's console."""

    def __init__(self, sink, rank: int):
        super().__init__(level=logging.WARNING)
        self.sink, self.rank = sink, rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().strip().splitlines()[-1 if record.name == "py.warnings" else 0]
            self.sink.push.remote(Notice(f"rank {self.rank}: {message}"))
        except Exception:  # noqa: BLE001 - the console must never break training
            self.handleError(record)


def forward_worker_warnings(sink, rank: int) -> None:
    """Route this worker's WARNING+ records of arflow_scale and its Python warnings to the console sink."""
    if sink is None:
        return
    handler = SinkHandler(sink, rank)
    logging.captureWarnings(True)
    for name in ("arflow_scale", "py.warnings"):
        logging.getLogger(name).addHandler(handler)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations are not the user's
    warnings.filterwarnings("default", category=RuntimeWarning, module=r"arflow_scale\..*")
