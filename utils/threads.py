"""How many cores this process may use, and how its OpenMP threads wait: settings for a CPU shared with other work.

Why: PyTorch's CPU kernels run in OpenMP parallel regions. By default GNU OpenMP (the runtime PyTorch's Linux
wheels ship) lets a thread that reaches the end of a region spin for a few milliseconds before it sleeps. On a
machine of its own that saves a wake-up; beside another busy process the spinning thread burns the core the
thread it waits for (or the neighbour) needs, and every operator ends in such a wait. Measured on 2 shared
cores (benchmarks/results/shared_cpu.md): a gelan-t forward took 6-12x longer spinning than sleeping at a load
of 8-10. So, unless the user chose otherwise, waiting threads sleep (OMP_WAIT_POLICY=PASSIVE).

The runtime reads these variables once, when torch loads it; so `configure_openmp` runs from the package's
`__init__`, before any module of this project imports torch. A program that imports torch before this
package keeps the runtime's defaults (set OMP_WAIT_POLICY=PASSIVE in its environment instead).

No torch import here (that is the point).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # set by the user: their choice stands
MAX_FRAME_WORKERS = 4  # frames a video/folder run keeps in flight on a CPU at most (more cores: more threads per frame)
APPLIED: dict[str, str] = {}  # what configure_openmp() put into os.environ


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """CPUs the control-group quota allows this process (e.g. 1.5 for `docker --cpus 1.5`), the tightest limit on
    the way from its cgroup up to the root; None when there is no quota or it cannot be read.

    cgroup v2: `cpu.max` ("max 100000" or "150000 100000"); v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us`.
    """
    root = Path(root)
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2 unified hierarchy
            base = root if (root / "cpu.max").exists() or not (root / "unified").is_dir() else root / "unified"
            limits += _walk(base, rel, _v2_limit)
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct"):
                if (root / name).is_dir():
                    limits += _walk(root / name, rel, _v1_limit)
                    break
    return min(limits) if limits else None


def _walk(base: Path, rel: str, read) -> list[float]:
    """Limits found in `base`/`rel` and each parent up to `base` (inside a container the own cgroup is often
    mounted as the root, so `rel` may not exist below it: then only `base` is read)."""
    out = []
    d = base / rel.strip("/")
    while True:
        v = read(d)
        if v is not None:
            out.append(v)
        if d == base or base not in d.parents:
            break
        d = d.parent
    return out


def _v2_limit(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def torch_default_threads(environ: dict | None = None) -> int:
    """The intra-op thread count torch will start with, known without importing it (utils/deploy/early_compile.py
    needs it before torch is loaded): the machine's physical cores (what torch counts; the affinity mask does not
    enter), fewer when OMP_NUM_THREADS, else MKL_NUM_THREADS, is a smaller positive integer (torch reads them in
    that order and never starts more threads than cores)."""
    env = os.environ if environ is None else environ
    cores = physical_cores()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        v = env.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return min(int(v), cores)
    return cores


def physical_cores(sysfs: str | Path = "/sys/devices/system/cpu") -> int:
    """Physical cores of the machine (hyper-threads of one core counted once), from the kernel's topology files;
    os.cpu_count() where they cannot be read."""
    cores = set()
    for f in Path(sysfs).glob("cpu[0-9]*/topology/thread_siblings_list"):
        try:
            cores.add(f.read_text().strip())
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def affinity_cores() -> int:
    """Cores in this process's CPU affinity mask (taskset, container cpusets); all cores where there is none."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, container cpusets), capped by the cgroup quota
    rounded down (a quota of 1.5 CPUs gives 1: a second thread would only be throttled), at least 1."""
    n = affinity_cores()
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit + 1e-6)))
    return max(1, n)


def configure_openmp(environ: dict | None = None) -> dict[str, str]:
    """Set the OpenMP defaults for a shared CPU in `environ` (os.environ by default); returns what it set.

    - OMP_WAIT_POLICY=PASSIVE unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is already set (the runtime's own
      default, spinning ~3 ms, is GOMP_SPINCOUNT=300000 with no policy);
    - OMP_NUM_THREADS = usable cores when a cgroup quota allows fewer cores than the affinity mask shows
      (the runtime counts the mask only) and OMP_NUM_THREADS is unset.
    Child processes (DataLoader workers, torchrun ranks, subprocesses) inherit both.
    """
    env = os.environ if environ is None else environ
    done: dict[str, str] = {}
    if not any(v in env for v in WAIT_VARIABLES):
        env["OMP_WAIT_POLICY"] = done["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" not in env:
        cores = usable_cores()
        if cores < affinity_cores():
            env["OMP_NUM_THREADS"] = done["OMP_NUM_THREADS"] = str(cores)
    if environ is None:
        APPLIED.update(done)
    return done


def user_environ() -> dict[str, str]:
    """os.environ without what configure_openmp() added: the environment the user started with (benchmarks run
    other programs, and older checkouts, with it)."""
    return {k: v for k, v in os.environ.items() if not (k in APPLIED and APPLIED[k] == v)}


def cpu_time_sample(task_dir: str | Path = "/proc/self/task", stat: str | Path = "/proc/stat") -> tuple | None:
    """(seconds this process's threads ran, seconds they waited on a run queue for a core, seconds the machine's
    cores stood idle), all cumulative, from the kernel's own accounting; None where /proc does not give them."""
    run = wait = 0
    try:
        for tid in os.listdir(task_dir):
            try:
                r, w = open(os.path.join(task_dir, tid, "schedstat")).read().split()[:2]
            except (OSError, ValueError):
                continue  # a thread that ended meanwhile
            run, wait = run + int(r), wait + int(w)
        cpu = open(stat).readline().split()
        idle = (int(cpu[4]) + int(cpu[5])) / os.sysconf("SC_CLK_TCK")  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None
    return run / 1e9, wait / 1e9, idle


class ThreadGovernor:
    """Intra-op threads that follow the CPU this process actually gets: fewer while its threads queue for a core
    behind other work, one more again when a core stands idle.

    Why: torch splits each operator evenly over its threads and waits for the last one. When another program takes
    a core, one thread falls behind at every operator and the others wait for it, so two threads beside a busy
    neighbour do worse than one thread would (measured: benchmarks/results/shared_cpu.md). `step()` is cheap and
    called often (every training batch); at most once per `period` seconds it reads the kernel's accounting
    (`cpu_time_sample`): when more than `drop` of the time our threads wanted a core was spent waiting for one,
    the thread count falls in proportion; when the machine had at least `idle_cores` idle and our threads hardly
    waited, it rises by one, up to `max_threads`. After a change it waits one more period before judging.
    """

    def __init__(self, set_threads, threads: int, max_threads: int, period: float = 2.0, drop: float = 0.3,
                 idle_cores: float = 0.75, clock=None, sample=cpu_time_sample, log=None):
        import time
        self.set_threads, self.threads, self.max_threads = set_threads, int(threads), int(max_threads)
        self.period, self.drop, self.idle_cores = period, drop, idle_cores
        self.clock, self.sample, self.log = clock or time.monotonic, sample, log
        self.last = (self.clock(), self.sample())
        self.settle = 0  # periods to wait after a change
        self.changes: list[tuple[int, int]] = []  # (from, to), for tests and the log

    def step(self) -> int:
        now = self.clock()
        t0, s0 = self.last
        if now - t0 < self.period or s0 is None:
            return self.threads
        s1 = self.sample()
        self.last = (now, s1)
        if s1 is None:
            return self.threads
        if self.settle:
            self.settle -= 1
            return self.threads
        dt = now - t0
        run, wait, idle = (b - a for a, b in zip(s0, s1))
        waited = wait / (run + wait) if run + wait > 0 else 0.0
        new = self.threads
        if self.threads > 1 and waited > self.drop:
            new = max(1, round(self.threads * (1 - waited)))
        elif self.threads < self.max_threads and idle / dt >= self.idle_cores and waited < self.drop / 3:
            new = self.threads + 1
        if new != self.threads:
            self.changes.append((self.threads, new))
            if self.log is not None:
                self.log(f"CPU threads {self.threads} -> {new}: threads waited {waited:.0%} of the time they wanted a "
                         f"core, {idle / dt:.1f} cores idle")
            self.threads = new
            self.set_threads(new)
            self.settle = 1
        return self.threads

    def restore(self) -> None:
        """Back to the full thread count (the job that was governed has ended)."""
        if self.threads != self.max_threads:
            self.threads = self.max_threads
            self.set_threads(self.max_threads)
