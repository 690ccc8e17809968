"""What the benchmarks share: machine facts, data subsets and PNG folders, result files, tables.

Every result file (`benchmarks/results/NAME.json`, written atomically) carries the machine,
versions and commit it was measured on; tables are printed as markdown for BENCHMARKS.md.
Data is only ever written to temporary folders, never into the repository.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distmed.artifacts import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
# CPU features that decide which precision distmed's `train.amp=auto` picks and how fast it is.
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
# Images kept in the val and test splits of a subset .npz: the format needs all three splits.
SUBSET_VAL = 4
SUBSET_TEST = 4
# The Ray Train worker's command name as /proc shows it (truncated to 15 characters).
TRAIN_WORKER = "ray::RayTrainWorker"[:15]


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, library versions, git commit and date of this measurement."""
    import ray
    import torch
    import torchvision
    from PIL import __version__ as pillow_version

    from distmed.loop import cpu_has_native_bf16

    flags = _cpu_flags()
    commit, dirty = git_commit()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpuinfo_value("model name") or platform.processor() or "unknown",
        "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
        "native_bf16": cpu_has_native_bf16(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        # The machine may be shared: a busy neighbour slows every number in the file.
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
        "pillow": pillow_version,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def usable_cpus() -> int:
    """CPUs this process may run on: what a local Ray cluster gives its one worker here."""
    return len(os.sched_getaffinity(0))


def git_commit() -> tuple[str, bool]:
    """(HEAD commit, whether tracked files differ from it); ('unknown', False) outside git.
    The results folder is left out: a benchmark rewrites its results file between its parts,
    which changes no code the next part runs."""
    try:
        commit = _git("rev-parse", "HEAD")
        outputs = f":(exclude){RESULTS.relative_to(REPO)}"
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", outputs))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, dirty


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _cpuinfo_value(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    return set((_cpuinfo_value("flags") or "").split())


def _meminfo_kib(key: str) -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming what the numbers were measured on, for the top of a table."""
    flags = ", ".join(machine["cpu_flags"]) or "no AVX2/AVX-512"
    dirty = " (+ uncommitted changes)" if machine["git_dirty"] else ""
    load = ", ".join(f"{x:.1f}" for x in machine["load_average_at_start"])
    return (
        f"{machine['cpu_model']}, {machine['usable_cpus']} cores ({flags}), "
        f"{machine['memory_gib']:g} GiB; torch {machine['torch']}, torchvision "
        f"{machine['torchvision']}, ray {machine['ray']}; commit {machine['git_commit'][:10]}"
        f"{dirty}; {machine['date']}; load average at start {load}"
    )


@dataclass(frozen=True)
class CpuSnapshot:
    """Machine-wide and own CPU seconds at one moment: to see who else used the CPUs.

    The machine is shared, so every timing records how many cores other processes (and
    the hypervisor, as steal time) took meanwhile; a high value marks a disturbed number.
    "Own" is this process plus its reaped children (loader processes, a finished benchmark
    process); `SessionCpu` adds the grandchildren that a child starts, such as Ray's.
    """

    wall: float
    busy: float  # all processes of this machine: user, nice, system, irq, softirq
    steal: float  # time the hypervisor gave this machine's CPUs to someone else
    own: float

    @classmethod
    def take(cls, children: bool = True) -> CpuSnapshot:
        """Now; `children=False` leaves reaped child processes out of "own"."""
        busy, steal = _proc_stat_seconds()
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)[: 2 if children else 1]:
            usage = resource.getrusage(who)
            own += usage.ru_utime + usage.ru_stime
        return cls(time.perf_counter(), busy, steal, own)

    def others_since(self, start: CpuSnapshot, also_ours: float = 0.0) -> dict[str, float]:
        """Average cores used by everything else, and stolen, between `start` and now."""
        wall = max(self.wall - start.wall, 1e-9)
        other = (self.busy - start.busy) - (self.own - start.own) - also_ours
        return {
            "other_cores": round(max(0.0, other) / wall, 3),
            "steal_cores": round((self.steal - start.steal) / wall, 3),
        }


class SessionCpu:
    """CPU seconds used by the processes of one session, but its leader, sampled from /proc.

    A benchmark process started with `start_new_session=True` leads a session that every
    process it starts joins (Ray's daemons and workers too); those are not our children, so
    `getrusage` never sees them. What a member uses after its last sample (Ray shutting
    down) is missed, and so counted as someone else's: the error errs towards "disturbed".

    It also tells apart, in the sampling intervals where the Ray Train worker kept at least
    one core busy (it was training), the CPU that every other process of the session took
    meanwhile, the leader (the driver) included: on a 2-core machine that is CPU the
    training threads do not get.
    """

    def __init__(self, leader: int, worker: str = TRAIN_WORKER) -> None:
        self.leader = leader
        self.worker = worker
        self.seen: dict[int, tuple[str, float]] = {}
        self.total = 0.0
        self.last_wall: float | None = None
        self.training_wall = 0.0
        self.training_cpu: dict[str, float] = {}  # by command name, while the worker trained

    def sample(self) -> None:
        wall, now = time.perf_counter(), _session_cpu_seconds(self.leader)
        used = {
            pid: (name, seconds - self.seen.get(pid, (name, 0.0))[1])
            for pid, (name, seconds) in now.items()
        }
        # The leader is counted exactly once reaped (RUSAGE_CHILDREN), so not in `total`.
        self.total += sum(cpu for pid, (_, cpu) in used.items() if pid != self.leader)
        if self.last_wall is not None:
            self._add_training(wall - self.last_wall, used.values())
        self.last_wall, self.seen = wall, now

    def _add_training(self, interval: float, used: Iterable[tuple[str, float]]) -> None:
        used = list(used)
        if sum(cpu for name, cpu in used if name == self.worker) < interval:
            return  # starting, validating, checkpointing or done: not a training interval
        self.training_wall += interval
        for name, cpu in used:
            self.training_cpu[name] = self.training_cpu.get(name, 0.0) + cpu

    def training_summary(self, top: int = 6) -> dict[str, Any]:
        """Cores used by the worker and by everything else of the session while it trained."""
        wall = max(self.training_wall, 1e-9)
        others = {n: s for n, s in self.training_cpu.items() if n != self.worker}
        busiest = sorted(others.items(), key=lambda item: -item[1])[:top]
        return {
            "training_wall_s": round(self.training_wall, 1),
            "worker_cores": round(self.training_cpu.get(self.worker, 0.0) / wall, 3),
            "others_cores": round(sum(others.values()) / wall, 3),
            "busiest_others": {name: round(s / wall, 3) for name, s in busiest},
        }


def _session_cpu_seconds(session: int) -> dict[int, tuple[str, float]]:
    """(command name, user + system seconds) of every live process in `session`, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        # "pid (command) state ppid pgrp session ... utime stime ...": the command may itself
        # hold spaces and parentheses, so split at its last ")".
        head, tail = text.rsplit(")", 1)
        fields = tail.split()
        if int(fields[3]) == session:
            name = head.split("(", 1)[1]
            found[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return found


def _proc_stat_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot; NaN where unknown."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- data


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def write_subset_npz(source: Path, dest: Path, num_pool: int) -> Path:
    """A MedMNIST-format .npz whose CV pool (train + val) holds the first `num_pool` images.

    distmed's pool is train followed by val; a few val and test images keep every split
    present (distmed requires all six arrays). Raises ValueError when the source is too small.
    """
    arrays = read_npz(source)
    num_train = num_pool - SUBSET_VAL
    if num_train < 2 or num_train > len(arrays["train_images"]):
        raise ValueError(
            f"{source}: a pool of {num_pool} images needs {num_train} training images "
            f"(the source has {len(arrays['train_images'])})"
        )
    subset = {}
    for split, count in (("train", num_train), ("val", SUBSET_VAL), ("test", SUBSET_TEST)):
        for kind in ("images", "labels"):
            subset[f"{split}_{kind}"] = arrays[f"{split}_{kind}"][:count]
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dest, **subset)
    return dest


def pool_of(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the CV pool as distmed sees it: train followed by val."""
    arrays = read_npz(source)
    images = np.concatenate([arrays["train_images"], arrays["val_images"]])
    labels = np.concatenate([arrays["train_labels"], arrays["val_labels"]]).reshape(-1)
    return images, labels


def write_png_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> Path:
    """`root/<label>/<index>.png`, one grey PNG per image: what ImageFolder reads."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:05d}.png")
    return root


def imagefolder_transform(size: int, augment: bool) -> Any:
    """The hand-written baseline's per-image PIL pipeline; `augment` adds distmed's default
    training augmentation (horizontal flip, rotation up to 10 degrees) the usual way."""
    from torchvision import transforms

    from distmed.config import AugmentConfig
    from distmed.data import IMAGENET_MEAN, IMAGENET_STD

    steps: list[Any] = [transforms.Resize(size)]  # the 28 px PNG up to the model's size
    if augment:
        default = AugmentConfig()
        steps += [transforms.RandomHorizontalFlip(), transforms.RandomRotation(default.rotation)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def round_order(items: Sequence[str], number: int) -> list[str]:
    """`items` in order for round `number`: reversed every other round, so a drift of the
    machine during a comparison falls on every item alike."""
    return list(items) if number % 2 == 0 else list(reversed(items))


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """`benchmarks/results/NAME.json`, replaced atomically (a killed run leaves the old file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, payload)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A number for a table; '-' where nothing was measured."""
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
