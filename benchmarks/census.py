"""Who used the CPUs while a model trained: a per-process census from a `perf sched` recording.

Part 1e of BENCHMARKS.md asks where a Ray Train worker's lost images/s go. Record the
scheduler for a few seconds while a run trains (as root, or with CAP_PERFMON and tracefs
access), then sum it up here:
  perf sched record -a -o /tmp/sched.data sleep 8        # while e.g. benchmarks.hosting runs
  .venv/bin/python -m benchmarks.census /tmp/sched.data --process ray::RayTrainWo --name NAME
Prints, and writes to benchmarks/results/NAME.json: each process's share of a core, and for
the training process (`--process`: its pid, or a prefix of its main thread's name) how often
its threads were switched out while still runnable, for how long, and what ran instead.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result

# `perf script -F comm,pid,tid,cpu,time,event,trace`: "comm pid/tid [cpu] time: event: fields"
_LINE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+\[\d+\]\s+([\d.]+):\s+(\S+):\s+(.*)")
_SWITCH = re.compile(r"prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)")
_RUNTIME = re.compile(r"comm=(.*) pid=(\d+) runtime=(\d+)")


@dataclass
class Census:
    """What one recording saw: CPU time per process and the training threads' switch-outs."""

    seconds: float = 0.0
    thread_ns: Counter = field(default_factory=Counter)  # (thread id, thread name) -> ns
    process_of: dict[str, str] = field(default_factory=dict)  # thread id -> process id
    name_of: dict[str, str] = field(default_factory=dict)  # thread id -> thread name
    preempted: Counter = field(default_factory=Counter)  # training thread id -> count
    waiting_s: Counter = field(default_factory=Counter)  # training thread id -> runnable, off
    ran_instead: Counter = field(default_factory=Counter)  # (name, thread id) -> count

    def by_process(self) -> tuple[Counter, dict[str, Counter]]:
        """CPU ns per process id, and per thread name within each process."""
        total: Counter = Counter()
        threads: dict[str, Counter] = defaultdict(Counter)
        for (tid, name), ns in self.thread_ns.items():
            pid = self.process_of.get(tid, tid)
            total[pid] += ns
            threads[pid][name] += ns
        return total, threads

    def process_name(self, pid: str, threads: Counter) -> str:
        """The main thread's name, else the busiest thread's."""
        return self.name_of.get(pid) or threads.most_common(1)[0][0]


def read(lines: Iterable[str], process: str) -> Census:
    """Fold `perf script` lines into a Census; `process` (pid or name prefix) is the trainer."""
    census = Census()
    off_since: dict[str, float] = {}
    first = last = None
    for line in lines:
        match = _LINE.match(line)
        if not match:
            continue
        comm, pid, tid, stamp, event, rest = match.groups()
        now = float(stamp)
        first = now if first is None else first
        last = now
        census.process_of[tid] = pid
        census.name_of[tid] = comm
        if event == "sched:sched_stat_runtime":  # the fields name the thread that ran
            name, thread, ns = _RUNTIME.search(rest).groups()
            census.thread_ns[(thread, name)] += int(ns)
        elif event == "sched:sched_switch":
            prev, state, next_comm, next_tid = _SWITCH.search(rest).groups()
            if state.startswith("R") and _is_training(census, prev, process):
                census.preempted[prev] += 1
                census.ran_instead[(next_comm, next_tid)] += 1
                off_since[prev] = now
            if next_tid in off_since:
                census.waiting_s[next_tid] += now - off_since.pop(next_tid)
    census.seconds = (last - first) if first is not None else 0.0
    return census


def _is_training(census: Census, tid: str, process: str) -> bool:
    pid = census.process_of.get(tid)
    return pid is not None and _matches(pid, census.name_of.get(pid, ""), process)


def _matches(pid: str, name: str, process: str) -> bool:
    """`process` is a pid, or a prefix of the process's main-thread name."""
    return pid == process if process.isdigit() else name.startswith(process)


def summarise(census: Census, process: str, top: int = 25) -> dict[str, Any]:
    if census.seconds <= 0:
        raise SystemExit("the recording holds no scheduler events; record with perf sched")
    per_s = 1 / census.seconds
    cpu_ns, threads = census.by_process()
    names = {pid: census.process_name(pid, threads[pid]) for pid in cpu_ns}
    training = {pid for pid in cpu_ns if _matches(pid, names[pid], process)}
    processes = [
        {
            "pid": pid,
            "name": names[pid],
            "cores": ns / 1e9 * per_s,
            "threads": {n: v / 1e9 * per_s for n, v in threads[pid].most_common(4)},
        }
        for pid, ns in cpu_ns.most_common(top)
    ]
    # by process: a thread's process is known once any event of its own has been seen
    ran_instead: Counter = Counter()
    for (name, tid), n in census.ran_instead.items():
        ran_instead[(name, census.process_of.get(tid, "?"))] += n
    others = sum(ns for pid, ns in cpu_ns.items() if pid not in training and pid != "0")
    return {
        "seconds": census.seconds,
        "training_process": process,
        "training_cores": sum(cpu_ns[pid] for pid in training) / 1e9 * per_s,
        "other_cores": others / 1e9 * per_s,  # pid 0 is the idle task
        "processes": [p for p in processes if p["pid"] != "0"],
        "training_threads_switched_out_per_s": {
            census.name_of[t] + f" ({t})": n * per_s for t, n in census.preempted.most_common(4)
        },
        "training_threads_waiting_ms_per_s": sum(census.waiting_s.values()) * 1000 * per_s,
        "ran_instead_per_s": [
            {"name": name, "pid": pid, "per_s": n * per_s}
            for (name, pid), n in ran_instead.most_common(top)
        ],
    }


def format_report(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['seconds']:.1f} s recorded; training process ({summary['training_process']}) "
        f"{summary['training_cores']:.3f} cores, everything else {summary['other_cores']:.3f}",
        f"training threads runnable but off the CPU: "
        f"{summary['training_threads_waiting_ms_per_s']:.0f} ms per second",
        "",
        "| process | pid | cores | busiest threads |",
        "|---|---|---|---|",
    ]
    for p in summary["processes"]:
        threads = ", ".join(f"{n} {v:.4f}" for n, v in p["threads"].items())
        lines.append(f"| {p['name']} | {p['pid']} | {p['cores']:.4f} | {threads} |")
    lines += ["", "| ran while a training thread waited | pid | per s |", "|---|---|---|"]
    lines += [
        f"| {r['name']} | {r['pid']} | {r['per_s']:.0f} |" for r in summary["ran_instead_per_s"]
    ]
    return "\n".join(lines)


def perf_script(recording: Path) -> list[str]:
    command = ["perf", "script", "-i", str(recording), "-F", "comm,pid,tid,cpu,time,event,trace"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise SystemExit("perf is not installed (linux-tools); it reads the recording") from None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{recording}: perf script failed: {exc.stderr.strip()[:200]}") from None
    return done.stdout.splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.census", description=__doc__)
    parser.add_argument("recording", type=Path, help="a `perf sched record -a` file")
    parser.add_argument(
        "--process", default="ray::RayTrainWo", help="the training process: pid or name prefix"
    )
    parser.add_argument("--name", help="also write benchmarks/results/NAME.json")
    parser.add_argument("--note", default="", help="what was running, kept in the results")
    args = parser.parse_args(argv)
    if not args.recording.is_file():
        raise SystemExit(f"{args.recording}: no such recording; make one with perf sched record")
    summary = summarise(read(perf_script(args.recording), args.process), args.process)
    print(format_report(summary))
    if args.name:
        machine = machine_info()
        del machine["load_average_at_start"]  # it would be this summary's, not the recording's
        payload = {"benchmark": "census", "machine": machine, "note": args.note, **summary}
        print(write_result(args.name, payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
