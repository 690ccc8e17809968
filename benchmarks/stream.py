"""The streamed loader against the cache on a 3-node Ray cluster on one machine.

    python -m benchmarks.stream --plan        # what would run, nothing started
    python -m benchmarks.stream --quick       # 300 images, the whole path once (minutes)
    python -m benchmarks.stream               # 25,000 and 50,000 generated 28 px PNGs

Per size: generated class-folder PNGs; three `ray start` nodes (own CPUs, small object
stores). The pool's file list is published as a run publishes it (an index file in storage,
`StreamSpec.published`). One reader task per node plays a Train rank (drawing its own
`epoch_positions` share) and drains its rows for one epoch as a Train worker reads them
(windows of `stream_dataset`, read ahead: a training pass and a validation pass, as
`sharedpass` reads), tagging each row with the node its decoding task ran on. Sampled every
0.5 s: the resident memory of each node's process tree (its raylet and the workers under it)
and each node's object-store use. Also: k
filtered passes (what training each fold apart would read) against the shared pass, and the
cache on one node (its one-off decode, then an epoch read). No model: this is the data path's
delivery, images/s per node. Results: benchmarks/results/stream.json (+ a markdown table for
BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import machine_info, markdown_table, write_result

SIZES = (25_000, 50_000)
QUICK_SIZES = (300,)
NODES = 3
FOLDS = 5
SAMPLE_S = 0.5
# Planning figures, not measurements: PNG writes and 28 px decodes per second on 2 cores.
PLANNED_WRITE_PER_S = 4_000
PLANNED_DECODE_PER_S = 3_000


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK_SIZES if args.quick else tuple(args.sizes)
    print(plan_text(sizes, args), flush=True)
    if args.plan:
        return 0
    results = [measure(size, args) for size in sizes]
    payload = {"machine": machine_info(), "settings": vars(args), "sizes": results}
    if not args.quick:  # the 3-node run is `stream`; another node count gets its own file
        name = "stream" if args.nodes == NODES else f"stream-{args.nodes}node"
        print(f"wrote {write_result(name, payload)}")
    print(table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__)
    parser.add_argument("--plan", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--quick", action="store_true", help="300 images; writes no result")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--nodes", type=int, default=NODES, help="1: stream vs cache, one node")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--object-store-mib", type=int, default=128)
    parser.add_argument("--workdir", help="where the images go (default: a temporary folder)")
    return parser


def plan_text(sizes: tuple[int, ...], args: argparse.Namespace) -> str:
    """What a run does and about how long it takes (from the planning rates above)."""
    reads = 1 + 2 + FOLDS + 1  # warm-up, shared pass (train + val), k filtered, the cache
    seconds = sum(n / PLANNED_WRITE_PER_S + reads * n / PLANNED_DECODE_PER_S for n in sizes)
    return (
        f"[stream] sizes {', '.join(f'{n:,}' for n in sizes)} at {args.image_size} px; "
        f"{args.nodes} nodes x {args.cpus_per_node} CPUs, object store {args.object_store_mib} MiB "
        f"each; per size: shared pass, {FOLDS} filtered passes, cache on one node; "
        f"about {seconds / 60:.0f} min at a planned {PLANNED_DECODE_PER_S:,} decodes/s"
    )


# --------------------------------------------------------------------------- data


def write_images(root: Path, count: int, size: int) -> Path:
    """`count` grey PNGs in two class folders, class-dependent brightness, seeded."""
    rng = np.random.default_rng(0)
    for i in range(count):
        label = i % 2
        folder = root / ("neg", "pos")[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(60 + 120 * label, 40, (size, size)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8), "L").save(folder / f"img{i:06d}.png")
    return root


# --------------------------------------------------------------------------- cluster


class Cluster:
    """`nodes` `ray start --block` processes on this machine; `stop()` ends them (and only
    them: run under the shared Ray lock, one cluster per machine)."""

    def __init__(
        self, nodes: int, cpus: int, object_store_mib: int, temp: Path, port: int = 6390
    ) -> None:
        self.count = nodes
        ray_bin = str(Path(sys.executable).with_name("ray"))
        store = str(object_store_mib * 2**20)
        common = ["--block", "--num-cpus", str(cpus), "--num-gpus", "0"]
        common += ["--object-store-memory", store]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.address = f"127.0.0.1:{port}"
        head = [ray_bin, "start", "--head", "--port", str(port), "--temp-dir", str(temp)]
        head += ["--include-dashboard", "false"]
        self.nodes = [subprocess.Popen([*head, *common], env=env)]
        self.joining = [ray_bin, "start", "--address", self.address, *common]
        self.env = env
        time.sleep(5)  # the head's GCS first

    def join(self) -> None:
        """Join the other nodes one at a time (connected to the head first): two `ray start`
        processes started together on one host raced for the same port and one raylet died
        ('bind: Address already in use'), as tests/test_faults_ray.py's `_joined_node` avoids."""
        for count in range(2, self.count + 1):
            self.nodes.append(subprocess.Popen(self.joining, env=self.env))
            self._wait_for(count)

    def _wait_for(self, count: int) -> None:
        import ray

        deadline = time.monotonic() + 120
        while sum(n["Alive"] for n in ray.nodes()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {count} of {self.count} did not join in 120 s")
            time.sleep(0.5)

    def stop(self) -> None:
        for node in reversed(self.nodes):  # SIGINT: `ray start --block` cleans its node up
            node.send_signal(signal.SIGINT)
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()


def node_memory() -> dict[int, float]:
    """Resident MiB of each raylet's process tree (a node's workers hang under its raylet)."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        if "raylet" not in (proc.info["name"] or ""):
            continue
        try:
            tree = [proc, *proc.children(recursive=True)]
            out[proc.pid] = sum(p.memory_info().rss for p in tree) / 2**20
        except psutil.Error:
            continue
    return out


def object_store_use() -> dict[str, float]:
    """MiB of object store in use per node (total minus available)."""
    from ray._private import state

    total, free = state.total_resources_per_node(), state.available_resources_per_node()
    return {
        node: (total[node].get("object_store_memory", 0) - free[node].get("object_store_memory", 0))
        / 2**20
        for node in total
        if node in free
    }


class Sampler(threading.Thread):
    """Per-node RSS and object-store use while a measurement runs: the peaks, and the
    object store's median and first- and last-third means (a store that fills as the pass
    goes on, a leak, shows as last > first; a peak alone also grows with the number of
    samples it is the maximum of)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.rss: dict[int, float] = {}
        self.store: dict[str, list[float]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            for key, value in node_memory().items():
                self.rss[key] = max(self.rss.get(key, 0.0), value)
            for node, value in object_store_use().items():
                self.store.setdefault(node, []).append(value)

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.join()
        # Nodes in the order of their peaks, the same order in every list.
        series = sorted((np.asarray(v) for v in self.store.values()), key=np.max)

        def per_node(stat: Any) -> list[float]:
            return [round(float(stat(v)), 1) for v in series]

        third = lambda v: max(1, len(v) // 3)  # noqa: E731
        return {
            "peak_rss_mib_per_node": sorted(round(v, 1) for v in self.rss.values()),
            "peak_object_store_mib_per_node": per_node(np.max),
            "median_object_store_mib_per_node": per_node(np.median),
            "first_third_object_store_mib_per_node": per_node(lambda v: v[: third(v)].mean()),
            "last_third_object_store_mib_per_node": per_node(lambda v: v[-third(v) :].mean()),
            "object_store_samples_per_node": [len(v) for v in series],
        }


# --------------------------------------------------------------------------- measurements


def decode_and_tag(
    batch: dict[str, np.ndarray], options: dict[str, Any], index: str | None = None
) -> dict[str, Any]:
    """`decode_batch`, plus the node each row was decoded on (inside the decoding task)."""
    import ray

    from distmed.data.stream import decode_batch

    node = ray.get_runtime_context().get_node_id()
    decoded = decode_batch(batch, options, index)
    return {**decoded, "node": np.array([node] * len(batch["position"]))}


def read_share(spec: Any, share: dict[str, Any], batch: int) -> dict[str, Any]:
    """Drain one rank's share as `stream_batches` reads it (windows, read ahead); returns
    images, seconds and which node decoded how many. `share`: {rank, world, train, fold}, the
    rank drawing its own positions (`epoch_positions`) as a Train rank does, so no position
    list crosses into Ray (fold: the pool without that fold, `None`: the whole pool)."""
    from distmed.data.stream import epoch_positions, read_ahead, window_datasets

    pool = np.arange(spec.rows)
    if share["fold"] is not None:
        pool = pool[pool % FOLDS != share["fold"]]
    positions = epoch_positions(pool, 0, 0, share["rank"], share["world"], share["train"])

    def chunks() -> Any:
        for dataset in window_datasets(spec, positions, batch, decoder=decode_and_tag):
            yield from dataset.iter_batches(
                batch_size=batch, batch_format="numpy", prefetch_batches=spec.prefetch_batches
            )

    started, count, nodes = time.perf_counter(), 0, Counter()
    for chunk in read_ahead(chunks(), spec.prefetch_batches):
        count += len(chunk["position"])
        nodes.update(chunk["node"].tolist())
    return {"images": count, "seconds": time.perf_counter() - started, "decoded_on": nodes}


def run_ranks(
    spec: Any, world: int, train: bool, batch: int, fold: int | None = None
) -> list[dict[str, Any]]:
    """One reader task per node (SPREAD), each draining its share at the same time."""
    import ray

    remote = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(read_share)
    shares = [{"rank": r, "world": world, "train": train, "fold": fold} for r in range(world)]
    return ray.get([remote.remote(spec, share, batch) for share in shares])


def measure(size: int, args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from distmed.config import DataConfig
    from distmed.data import build_cache, load_cached, scan_source
    from distmed.data.stream import StreamSpec

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dmstream"))
    temp = Path(tempfile.mkdtemp(prefix="dmr", dir="/tmp"))  # Ray's socket paths stay short
    root = write_images(work / f"images-{size}", size, args.image_size)
    cfg = DataConfig(root=str(root), image_size=args.image_size, cache_dir=str(work / "cache"))
    index = scan_source(cfg)
    paths = [str(p) for p in index.pool.paths or []]
    # As a run publishes it (`pipeline.connect`): the file list as an index file in storage.
    spec = StreamSpec(paths=paths, options=cfg.decode_settings(), decode_cpus=0.5)
    spec = spec.published(str(work / "storage"))
    nodes = args.nodes
    cluster = Cluster(nodes, args.cpus_per_node, args.object_store_mib, temp)
    result: dict[str, Any] = {"images": size}
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.join()
        run_ranks(spec, nodes, False, 64)  # untimed: workers start and import on every node
        sampler = Sampler()
        sampler.start()
        started = time.perf_counter()
        shared = run_ranks(spec, nodes, True, 64) + run_ranks(spec, nodes, False, 64)
        result["shared_pass_s"] = time.perf_counter() - started
        result.update(sampler.stop())
        result["images_per_s_per_node"] = [
            round(r["images"] / r["seconds"], 1) for r in shared[:nodes]
        ]
        decoded = Counter()
        for r in shared:
            decoded.update(r["decoded_on"])
        result["decodes_per_node"] = sorted(decoded.values())
        started = time.perf_counter()
        for fold in range(FOLDS):  # what training each fold apart reads: k filtered passes
            run_ranks(spec, nodes, True, 64, fold)
        run_ranks(spec, nodes, False, 64)
        result["filtered_passes_s"] = time.perf_counter() - started
    finally:
        # Before the nodes go: an exception raised while connected to a dying cluster hung in
        # Ray's excepthook (it reports the error to the GCS being stopped).
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)
    started = time.perf_counter()
    cache = build_cache(index, cfg.model_copy(update={"decode_workers": args.cpus_per_node}))
    result["cache_decode_s"] = time.perf_counter() - started
    started = time.perf_counter()
    images = load_cached(cache.pool_path)
    for start in range(0, len(images), 64):  # an epoch's read, as the loader reads it
        np.asarray(images[start : start + 64]).sum()
    result["cache_epoch_read_s"] = time.perf_counter() - started
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[stream] {size:,} images: {result}", flush=True)
    return result


def table(results: list[dict[str, Any]]) -> str:
    headers = ["images", "peak RSS MiB/node", "object store MiB/node", "img/s/node",
               "decodes/node", "shared pass s", f"{FOLDS} filtered s", "cache decode s",
               "cache epoch s"]  # fmt: skip
    rows = [
        [f"{r['images']:,}", str(r["peak_rss_mib_per_node"]),
         str(r["peak_object_store_mib_per_node"]), str(r["images_per_s_per_node"]),
         str(r["decodes_per_node"]), f"{r['shared_pass_s']:.1f}", f"{r['filtered_passes_s']:.1f}",
         f"{r['cache_decode_s']:.1f}", f"{r['cache_epoch_read_s']:.2f}"]
        for r in results
    ]  # fmt: skip
    return markdown_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())
