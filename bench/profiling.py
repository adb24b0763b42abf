"""Where a process's time goes during a benchmark: py-spy (``pip install py-spy``; not a project
dependency) samples it, writes collapsed stacks (for flamegraph.pl or speedscope), and ``top``
reads them back as the functions holding the most samples, by own time and with callees.
A profiled run is slower than an unprofiled one: report its shares, not its timings."""

import signal
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

RATE = 50  # samples a second: enough for shares over tens of seconds, a few % of a core


class Sampler:
    """py-spy on each of ``pids`` (``{name: pid}``) from ``start`` until ``stop``; the stacks go
    to ``directory / f"{prefix}-{name}.folded"``."""

    def __init__(self, pids: dict[str, int], directory: Path, prefix: str):
        self.files = {name: Path(directory) / f"{prefix}-{name}.folded" for name in pids}
        self.pids, self.spies = pids, []

    def start(self):
        py_spy = str(Path(sys.executable).parent / "py-spy")
        for name, pid in self.pids.items():
            options = ["--nonblocking", "--rate", str(RATE), "--format", "raw", "--output", str(self.files[name])]
            self.spies.append(
                subprocess.Popen(
                    [py_spy, "record", *options, "--pid", str(pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def stop(self, shown: int = 12) -> dict[str, dict]:
        """Stops sampling (py-spy writes its file when interrupted); ``top`` of each file."""
        for spy in self.spies:
            spy.send_signal(signal.SIGINT)
        for spy in self.spies:
            spy.wait(60)
        return {name: top(path, shown) for name, path in self.files.items() if path.exists()}


@contextmanager
def sampled(enabled: bool, pids: dict[str, int], prefix: str):
    """``with sampled(args.profile, pids, "bench-e2e-burst") as profile:`` — py-spy on the
    processes while the block runs, when ``enabled``; ``profile`` is then filled with each one's
    ``top`` (and stays empty when not enabled). The stacks go to the current directory."""
    profile: dict = {}
    sampler = Sampler(pids, Path.cwd(), prefix) if enabled else None
    if sampler:
        sampler.start()
    try:
        yield profile
    finally:
        if sampler:
            profile.update(sampler.stop())


def top(path: Path, shown: int = 12) -> dict:
    """The functions with the most samples in a collapsed-stacks file: ``own`` (the innermost
    frame: where the time is spent) and ``with_callees`` (a frame anywhere on the stack: what the
    time is spent for), each as a share of all samples."""
    own, anywhere, total = Counter(), Counter(), 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [_function(frame) for frame in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            anywhere[frame] += samples
    share = lambda counter: {f: round(n / total, 3) for f, n in counter.most_common(shown)}  # noqa: E731
    return {"samples": total, "own": share(own), "with_callees": share(anywhere)} if total else {"samples": 0}


def _function(frame: str) -> str:
    """``name (path/to/module.py:LINE)`` → ``name (module.py)``: lines apart, one function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rsplit(':', 1)[0]).name})" if where else name
