"""`runops bench --profile DIR`: py-spy records every process of each measured phase (the
services a benchmark started, the drainers, the load generator), one raw file per process per
phase (`<benchmark>-<phase>-<process>.txt`), and `DIR/summary.md` gives each one's busy share
and top self-time frames.

How the benchmarks take part, with no profiler active every call is a no-op:
- `watching(name, pid)` around a service process's life: recorded in every phase meanwhile;
- `loadgen.drive` opens a phase at the load generator's "start" mark and closes it at "end"
  (the measured window, warm-up excluded), or joins a phase a benchmark opened around a
  load generator without marks (`phase(name)`).

py-spy runs `--nonblocking` (the process is never paused) and without `--idle`, so every sample
is one of a thread running: busy = samples / (rate x seconds recorded), in cores. A service of
RUNOPS_PROCESSES > 1 is a supervisor and its children: each child is recorded too
(`<process>-child-N`); not with `--subprocesses`, which would take in the bench process's
children (load generators, services) where it serves the control plane or a bare servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

RATE = 100  # samples a second
TOP_FRAMES = 12
ATTACH_SECONDS = 3.0  # for py-spy to start sampling
STOP_SECONDS = 10.0  # for py-spy to write its file after SIGINT
LOADGEN = "loadgen"
INSTALL_HINT = (
    "runops bench --profile needs py-spy on PATH or beside this Python:"
    " pip install py-spy (it is in the dev extra: pip install -e '.[dev]')"
)


def py_spy() -> str | None:
    """The py-spy executable: beside this interpreter (its venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def interpreter_pid(pid: int) -> int:
    """`pid` if it runs a Python interpreter, else its first Python child (a launcher or shim
    that did not exec)."""
    with contextlib.suppress(OSError):
        if "python" in Path(f"/proc/{pid}/exe").resolve().name:
            return pid
    return next(iter(python_children(pid)), pid)


def python_children(pid: int) -> list[int]:
    """The Python processes `pid` started (directly), e.g. a supervisor's server processes;
    not multiprocessing's resource tracker, which serves nothing."""
    found = []
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                python = "python" in Path(f"/proc/{child}/exe").resolve().name
                if (
                    python
                    and b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()
                ):
                    found.append(int(child))
    return found


def slug(text: str) -> str:
    """A phase's label as part of a file name: `CreateRuns (gRPC)` -> `createruns-grpc`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "phase"


@dataclass
class Recording:
    benchmark: str
    phase: str
    process: str
    pid: int
    path: Path
    started: float
    seconds: float = 0.0
    error: str = ""


@dataclass
class _Live:
    recording: Recording
    proc: asyncio.subprocess.Process


@dataclass
class Profiler:
    directory: Path
    executable: str
    rate: int = RATE
    benchmark: str = ""
    # What every phase records: name -> (pid, its Python children too).
    processes: dict[str, tuple[int, bool]] = field(default_factory=dict)
    recordings: list[Recording] = field(default_factory=list)
    phase_name: str | None = None
    _live: list[_Live] = field(default_factory=list)

    async def begin(self, phase: str, **more: int) -> bool:
        """Record every watched process (and `more`: name=pid) from now on; False (nothing
        done) if a phase is open."""
        if self.phase_name is not None:
            return False
        self.phase_name = phase
        watched: dict[str, int] = {}
        for name, (pid, children) in self.processes.items():
            watched[name] = pid
            if children:
                for n, child in enumerate(python_children(pid), 1):
                    watched[f"{name}-child-{n}"] = child
        await self.add(**watched, **more)
        return True

    async def add(self, **processes: int) -> None:
        """Record these processes (name=pid) too, until the open phase ends (none open:
        nothing); back once each recorder samples (py-spy takes a moment to attach)."""
        if self.phase_name is None:
            return
        started = [await self._record(name, pid) for name, pid in processes.items()]
        deadline = time.monotonic() + ATTACH_SECONDS
        for one in started:
            log = one.recording.path.with_suffix(".log")
            while time.monotonic() < deadline and one.proc.returncode is None:
                if b"Sampling process" in log.read_bytes():
                    break
                await asyncio.sleep(0.02)
            one.recording.started = time.monotonic()

    async def _record(self, process: str, pid: int) -> _Live:
        assert self.phase_name is not None
        pid = interpreter_pid(pid)
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"{slug(self.benchmark)}-{slug(self.phase_name)}-{slug(process)}"
        path = self.directory / f"{stem}.txt"
        for n in range(2, 1000):  # a repeated phase: -2, -3...
            if not path.exists() and all(r.path != path for r in self.recordings):
                break
            path = self.directory / f"{stem}-{n}.txt"
        recording = Recording(self.benchmark, self.phase_name, process, pid, path, time.monotonic())
        log = path.with_suffix(".log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                self.executable, "record", "--pid", str(pid), "--format", "raw",
                "--output", str(path), "--rate", str(self.rate), "--nonblocking",
                "--full-filenames",
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        live = _Live(recording, proc)
        self._live.append(live)
        return live

    async def end(self) -> None:
        """Stop every recording of the open phase (SIGINT: py-spy writes its file)."""
        live, self._live, self.phase_name = self._live, [], None
        for one in live:
            one.recording.seconds = time.monotonic() - one.recording.started
            if one.proc.returncode is None:
                one.proc.send_signal(signal.SIGINT)
        for one in live:
            try:
                await asyncio.wait_for(one.proc.wait(), STOP_SECONDS)
            except TimeoutError:
                one.proc.kill()
                await one.proc.wait()
                one.recording.error = "py-spy did not stop"
            log = one.recording.path.with_suffix(".log")  # py-spy's own output
            if not one.recording.error and not one.recording.path.exists():
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                one.recording.error = f"no samples written ({' '.join(tail) or 'py-spy exited'})"
            if not one.recording.error:
                log.unlink(missing_ok=True)
            self.recordings.append(one.recording)

    def write_summary(self) -> Path:
        path = self.directory / "summary.md"
        path.write_text(summary(self.recordings, self.rate))
        return path


# The profiler of this `runops bench --profile` run (None: not profiling).
ACTIVE: Profiler | None = None


def start(directory: Path) -> Profiler:
    """Make the profiler active (py-spy must be there: see `py_spy`)."""
    global ACTIVE
    executable = py_spy()
    if executable is None:
        raise RuntimeError(INSTALL_HINT)
    ACTIVE = Profiler(directory, executable)
    return ACTIVE


def stop() -> None:
    global ACTIVE
    ACTIVE = None


@contextlib.contextmanager
def benchmark(name: str) -> Iterator[None]:
    """Recordings from now on are of benchmark `name` (and of its own processes only)."""
    if ACTIVE is None:
        yield
        return
    ACTIVE.benchmark, ACTIVE.processes = name, {}
    try:
        yield
    finally:
        ACTIVE.benchmark, ACTIVE.processes = "", {}


@contextlib.contextmanager
def watching(name: str, pid: int | None, *, children: bool = False) -> Iterator[None]:
    """Record process `pid` as `name` in every phase while inside (and, with `children`, each
    Python child it has when a phase begins: a service's RUNOPS_PROCESSES children)."""
    if ACTIVE is None or pid is None:
        yield
        return
    profiler = ACTIVE
    key = name
    for n in range(2, 100):  # a second process of the same name: name-2
        if key not in profiler.processes:
            break
        key = f"{name}-{n}"
    profiler.processes[key] = (pid, children)
    try:
        yield
    finally:
        profiler.processes.pop(key, None)


@contextlib.asynccontextmanager
async def phase(name: str) -> AsyncIterator[None]:
    """A measured phase: every watched process (and any load generator started inside) is
    recorded until it ends."""
    profiler = ACTIVE
    opened = profiler is not None and await profiler.begin(name)
    try:
        yield
    finally:
        if opened and profiler is not None:
            await profiler.end()


async def join(process: str, pid: int) -> None:
    """Record `pid` in the open phase (a load generator that just started)."""
    if ACTIVE is not None:
        await ACTIVE.add(**{process: pid})


async def begin(name: str, **more: int) -> bool:
    """Open a phase recording the watched processes and `more` (name=pid); True unless one is
    open or no profiler is active."""
    return ACTIVE is not None and await ACTIVE.begin(name, **more)


async def end() -> None:
    if ACTIVE is not None:
        await ACTIVE.end()


# -- reading the raw files --------------------------------------------------------------------


# Leaf frames of a thread waiting (py-spy's own idle check, from the thread's OS state, misses
# some): the event loop's select, an idle executor thread, a lock or condition wait.
IDLE_FRAMES = re.compile(
    r"^(\w*Selector\.select|select|poll|_worker|wait|acquire|sleep) \((selectors|asyncio/\w+"
    r"|concurrent/futures/thread|threading|python3\.\d+/selectors)"
)


@dataclass(frozen=True)
class Profile:
    samples: int
    self_time: Counter[str]  # leaf frame (function and file) -> samples

    @property
    def busy_samples(self) -> int:
        """Samples whose leaf frame is not a wait."""
        return self.samples - sum(n for f, n in self.self_time.items() if IDLE_FRAMES.match(f))


def _frame(text: str) -> str:
    """`func (/long/path/to/pkg/mod.py:123)` -> `func (pkg/mod.py)`: self time by function."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", text)
    if match is None:
        return text
    function, path = match.groups()
    parts = Path(path).parts
    for anchor in ("site-packages", "shared", "lib"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    return f"{function} ({'/'.join(parts[-3:])})"


def read(path: Path) -> Profile:
    """A py-spy raw file (`frame;frame;...;leaf count` a line)."""
    counts: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread ("))]
        samples += int(count)
        counts[_frame(frames[-1]) if frames else "(no Python frame)"] += int(count)
    return Profile(samples, counts)


def summary(recordings: list[Recording], rate: int) -> str:
    lines = [
        "# runops bench --profile: top self-time frames per process per phase",
        "",
        f"py-spy record --nonblocking --rate {rate} --format raw, per process (idle samples"
        " are not recorded). busy = samples with a non-idle leaf frame (not a select, lock or"
        " executor wait that py-spy's own idle check let through) / (rate x seconds recorded):"
        " the cores the process kept busy (its threads added up; 1.00 = one core"
        " all the time). Share"
        " = a frame's self-time samples / the process's samples. Raw files beside this one"
        " (`<benchmark>-<phase>-<process>.txt`, flamegraph.pl / speedscope read them).",
    ]
    heading = None
    for r in recordings:
        if (r.benchmark, r.phase) != heading:
            heading = (r.benchmark, r.phase)
            lines += ["", f"## {r.benchmark}: {r.phase}"]
        if r.error:
            lines += ["", f"**{r.process}** (pid {r.pid}, {r.seconds:.1f} s): {r.error}"]
            continue
        profile = read(r.path)
        busy = profile.busy_samples / (rate * r.seconds) if r.seconds > 0 else 0.0
        lines += [
            "",
            f"**{r.process}** (pid {r.pid}): busy {busy:.2f} ({profile.busy_samples:,} busy of"
            f" {profile.samples:,} samples in {r.seconds:.1f} s), `{r.path.name}`",
            "",
            "| share | self-time frame |",
            "|---:|---|",
        ]
        for frame, count in profile.self_time.most_common(TOP_FRAMES):
            share = count / profile.samples if profile.samples else 0.0
            lines.append(f"| {share:.1%} | `{frame}` |")
    return "\n".join(lines) + "\n"
