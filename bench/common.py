"""Shared bench plumbing: argument parsing, JSON output, tables, memory probes."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m indomain.bench.{name}", description=description)
    p.add_argument("--fast", action="store_true", help="tiny sizes and few repeats (for the test suite; figures are not meaningful)")
    p.add_argument("--out", type=Path, default=PACK_ROOT / "artifacts" / "bench" / f"{name}.json",
                   help="where to write the JSON results (default: artifacts/bench/%(prog)s.json)".replace("%(prog)s", name))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        from ..devkit.host import comfyui_dir

        root = comfyui_dir()
        env["comfyui_dir"] = str(root)
        version_file = root / "comfyui_version.py"
        if version_file.is_file():
            env["comfyui_version"] = version_file.read_text().split("=")[-1].strip().strip('"\'')
    except Exception:  # noqa: BLE001 - environment info is best-effort
        pass
    return env


def first_output(out):
    """Output 0 of a node called in-process: a V1 tuple or a V3 NodeOutput."""
    return out.result[0] if hasattr(out, "result") else out[0]


def write_json(path: Path, payload: dict) -> Path:
    """Atomic write (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)
    return path


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A GitHub-markdown table (pasteable into docs/)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    return "\n".join(lines)


def median(xs):
    return float(statistics.median(xs))


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread every `interval` s.

    On CUDA use torch.cuda.max_memory_allocated instead (see `PeakMemory`).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        import gc

        gc.collect()
        self.base = rss_bytes()
        self.peak = self.base
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.base


class PeakMemory:
    """Peak memory of the block: CUDA allocator peak above entry on GPU, RSS peak above entry on CPU."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self._rss = None if self.cuda else PeakRSS()
        self.delta = 0
        self.kind = "cuda_max_memory_allocated" if self.cuda else "process_rss_peak"

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._rss.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.delta = torch.cuda.max_memory_allocated() - self._base
        else:
            self._rss.__exit__(*exc)
            self.delta = self._rss.delta


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def mib(n: float) -> float:
    return n / 2 ** 20


def enable_stack_dumps() -> None:
    """`kill -USR1 <pid>` prints every thread's stack to stderr (to see where a long bench is)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (AttributeError, OSError, ValueError):  # stderr without a file descriptor (a test capturing it)
            pass


def timed_training(model, text, latents, cfg, device):
    """One train_on_latents run timed per optimizer step, with its peak memory. Returns (result, PeakMemory,
    per-step clock intervals, clock name, wall intervals): on the CPU with one torch thread the clock is the main
    thread's CPU time (the compute, unaffected by other load), else wall-clock."""
    import torch

    from ..training.trainer import train_on_latents

    stamps = []

    def progress(step, total, loss, ips):
        sync(device)
        stamps.append((time.perf_counter(), time.thread_time()))

    with PeakMemory(device) as mem:
        res = train_on_latents(model, text, latents, cfg, out_path=None, progress=progress)
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
    return res, mem, (cpu if cpu_clock else wall), ("main-thread CPU time" if cpu_clock else "wall-clock"), wall
