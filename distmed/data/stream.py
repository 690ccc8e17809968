"""The streaming source (`data.loader: stream`): the scanned index as Ray Data datasets whose
rows are decoded by the cache's own decoder in Ray Data tasks, spread over the cluster's CPUs.

What crosses into the Train workers is `StreamSpec`: file paths or URIs and decode settings,
never pixels. Each worker draws, per epoch, its own rows in a seeded order (`epoch_positions`)
and reads them with `iter_torch_batches` (prefetching), one window of WINDOW_ROWS rows at a
time: a Ray Data dataset built from rows keeps every input block in the object store while it
runs, so one dataset per epoch would grow the store with the data set. Windows bound those rows
(two windows at most: the one being read and the next, which a reader thread starts while the
step consumes the last batches); the pool's file list travels as an index file in the run's
storage, not in the object store (`StreamSpec.published`, `distmed.data.streamindex`), so a
row is its position only (8 bytes; the decoding task reads its files from the index) where
it was position and path (~100 bytes; BENCHMARKS.md part 10). Why not
`TorchTrainer(datasets=...)` and `get_dataset_shard`: its `streaming_split` hands blocks to
ranks as they finish (a rank's rows differ run to run), replays the same plan every epoch (no
per-epoch seed) and, with `equal=True`, drops rows a validation pass must score; a rank's
own seeded dataset gives the same order on every run and resumes exactly.

A streamed row is `decode.try_decode`'s image in the cache's colour layout, (3, S, S) uint8
with a grey image repeated over the channels (`cache._compact`): bit for bit the cached row of
a colour set, and the cached row repeated 3 times for an all-grey set (whose cache stores one
channel; `to_model_input` expands it to the same model input).
"""

from __future__ import annotations

import gc
import logging
import math
import platform
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distmed.data.decode import try_decode
from distmed.data.objects import is_uri, readable_file
from distmed.data.settings import DecodeSettings
from distmed.data.streamindex import index_paths, write_index
from distmed.errors import UserError, first_line

if TYPE_CHECKING:
    from distmed.config import DataConfig
    from distmed.data.index import Split

# Files per Ray Data block, so per decoding task: enough to amortise a task's start, few
# enough that every node gets work and one task's output stays a few MB at 224 px.
DECODE_CHUNK = 64
# Batches each worker's iterator decodes ahead of the step (Ray Data's prefetch_batches).
PREFETCH_BATCHES = 4
# Rows of one Ray Data dataset (rounded to whole batches): its input blocks (16 KB of positions
# at 2048 rows; 0.1-0.5 MB with paths, an unpublished spec) are what a streamed epoch keeps in the
# object store besides decoded pixels in flight. 32 decoding tasks a window keep every node of
# a small cluster busy.
WINDOW_ROWS = 2048
# The name of every streamed dataset: Ray Data logs three INFO lines per dataset it runs
# (start, plan, "finished in"), which a rank reading ~25 windows a pass would print by the
# hundred; `quiet_stream_logs` drops those of ours, and only those.
STREAM_DATASET_NAME = "distmed_stream"
# A full garbage collection (~0.1 s in a Train worker) at most this often frees the windows
# read since the last one (`window_datasets`): under 2% of a reader's time, and the store
# holds the windows of at most this many seconds, whatever the data set's size.
RELEASE_EVERY_S = 5.0
# A streamed row's channels (`stream_row`): what `best_model.pt` records as the layout the
# model was trained from (a grey image's cached row has 1; the model input is the same).
STREAM_CHANNELS = 3


class StreamSpec(BaseModel):
    """What a Train worker needs to stream the CV pool: files, decoding and task resources.

    The files, position i -> a local path every node can read or an s3:// / gs:// URI read
    through pyarrow with the node's own credential chain, are either `paths` (the driver's
    list, as scanned) or, once `published`, `index`: an Arrow IPC file in the run's storage
    (`distmed.data.streamindex`), so that what crosses into Ray stays the same size whatever
    the number of images. `rows`: how many files.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: list[str] | None = None
    index: str | None = None
    rows: int = Field(0, ge=0)
    options: DecodeSettings
    decode_cpus: float = Field(1.0, gt=0)
    prefetch_batches: int = Field(PREFETCH_BATCHES, ge=1)
    window: int = Field(WINDOW_ROWS, ge=1, description="rows per dataset (`window_rows`)")

    @model_validator(mode="before")
    @classmethod
    def _count_rows(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("paths") is not None:
            return {**values, "rows": len(values["paths"])}
        return values

    @model_validator(mode="after")
    def _one_source(self) -> StreamSpec:
        if (self.paths is None) == (self.index is None):
            raise ValueError("a StreamSpec has either paths or an index file, not both")
        return self

    def published(self, storage: str) -> StreamSpec:
        """This spec with its paths written as an index file under `storage` (an absolute
        folder or a URI every node reads; `streamindex.write_index`); itself when it is."""
        if self.paths is None:
            return self
        location = write_index(self.paths, storage)
        return self.model_copy(update={"paths": None, "index": location})

    def files(self, positions: np.ndarray) -> list[str]:
        """The files at pool `positions`, in that order."""
        if self.paths is not None:
            return [self.paths[int(p)] for p in positions]
        assert self.index is not None  # _one_source
        return index_paths(self.index, positions)


def split_stream(
    split: Split, options: DecodeSettings, decode_cpus: float, source: str
) -> StreamSpec:
    """The `StreamSpec` of a split's image files (local paths or URIs), in its order;
    `source` names the data source in the refusal.

    Raises:
        UserError: the split holds in-memory arrays (an .npz), which only the cache reads.
    """
    if split.uris is not None:
        paths = list(split.uris)
    elif split.paths is not None:
        paths = [str(p) for p in split.paths]
    else:
        raise UserError(
            f"data.loader: stream reads image files; {source} holds its images in an "
            "array (.npz): use data.loader: cache"
        )
    return StreamSpec(paths=paths, options=options, decode_cpus=decode_cpus)


def decode_reserve(data: DataConfig) -> float:
    """CPUs to keep out of the Train workers' share: one decoding task's under
    `data.loader: stream` (else the workers could hold every CPU while waiting for rows that
    no task can decode), none for the cache."""
    return data.stream_decode_cpus if data.loader == "stream" else 0.0


def stream_row(image: np.ndarray) -> np.ndarray:
    """A decoded (S, S) grey or (S, S, 3) RGB image as the cache's colour row (3, S, S)."""
    if image.ndim == 2:
        return np.repeat(image[None], 3, axis=0)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def decode_batch(
    batch: dict[str, np.ndarray], options: dict[str, Any], index: str | None = None
) -> dict[str, np.ndarray]:
    """Ray Data's map function: rows {position} (their files read from the stream `index`,
    `StreamSpec.index`) or {position, path} (`index` None) -> {position, image (B, 3, S, S)
    uint8}.

    The decoder is the cache's (`decode.try_decode`). An unreadable file stops the run with
    its name: every rank must see the same number of rows, so a row cannot silently vanish
    (check a source with `python -m distmed.data` or the cache first).

    Raises:
        UserError: a file cannot be decoded (the message names it and why).
    """
    settings = DecodeSettings.model_validate(options)
    size = settings.image_size
    paths = batch["path"] if index is None else index_paths(index, batch["position"])
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for row, path in enumerate(paths):
        with readable_object(str(path)) as local:
            image, reason = try_decode(local, settings)
        if image is None:
            raise UserError(
                f"data.loader stream: cannot decode {path} ({reason}); fix or remove it "
                "(a stream cannot leave files out: every rank must see the same rows)"
            )
        images[row] = stream_row(image)
    return {"position": np.asarray(batch["position"], dtype=np.int64), "image": images}


@contextmanager
def readable_object(path: str) -> Iterator[Path]:
    """`objects.readable_file` in a decoding task, where a bucket that this node cannot read
    (no credentials in its chain, a key gone) is the one line naming the object and the node:
    Ray Train would otherwise retry the whole worker group on a failure that repeats.

    Raises:
        UserError: the object cannot be read on this node (pyarrow already retried).
    """
    with ExitStack() as stack:
        try:  # the read only: what the caller does with the copy is not a read failure
            local = stack.enter_context(readable_file(path))
        except OSError as exc:
            if not is_uri(path):
                raise
            raise UserError(
                f"data.loader stream: cannot read {path} on node {platform.node()} "
                f"({type(exc).__name__}: {first_line(exc)}); every node that decodes must "
                "read the bucket with its own credentials (environment, profile or instance "
                "role: docs/data.md, 'Training from a bucket')"
            ) from exc
        yield local


def epoch_positions(
    positions: np.ndarray, seed: int, epoch: int, rank: int, world: int, train: bool
) -> np.ndarray:
    """One rank's pool positions for one epoch's pass, in the order it reads them.

    Training: every rank draws the same permutation of `positions` from (seed, epoch) and
    takes every world-th element from its rank, cut to len // world so that all ranks step
    in lockstep (up to world - 1 images, different ones each epoch, sit the epoch out).
    Validation: every world-th position from its rank, in order, none left out.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if not train:
        return positions[rank::world]
    order = np.random.default_rng([seed, epoch]).permutation(positions)
    return order[rank::world][: len(positions) // world]


def stream_dataset(spec: StreamSpec, positions: np.ndarray, decoder: Any = decode_batch) -> Any:
    """The Ray Data dataset of `positions` (in that order): rows {position, image (3, S, S)}.

    One block of at most DECODE_CHUNK files per decoding task, each task reserving
    `spec.decode_cpus`; Ray Data spreads its tasks over the nodes (its default, SPREAD; Ray
    2.60 deprecates setting it). The order is kept (`preserve_order`). `decoder`: the map
    function, `decode_batch` (a benchmark wraps it to see where it ran).
    """
    import ray.data

    # A published spec's rows are positions only (8 bytes a row): each decoding task reads
    # its files from the index, so a window's input blocks in the object store stay small.
    if spec.index is not None:
        rows: list[dict[str, Any]] = [{"position": int(p)} for p in positions]
    else:
        rows = [
            {"position": int(p), "path": path}
            for p, path in zip(positions, spec.files(positions), strict=True)
        ]
    # from_items builds the blocks in this process; from_arrow would run a 1-CPU metadata
    # task per block, which never starts where trials and workers leave every node less
    # than a whole free CPU (a streamed search): only the decoding tasks need CPUs.
    blocks = max(1, math.ceil(len(rows) / DECODE_CHUNK))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        decoder,
        fn_kwargs={"options": spec.options.model_dump(mode="json"), "index": spec.index},
        batch_size=None,  # one block, one task
        batch_format="numpy",
        num_cpus=spec.decode_cpus,
    )
    dataset.context.execution_options.preserve_order = True  # the seeded order, as drawn
    dataset.context.enable_progress_bars = False  # windows, two passes an epoch per rank: noise
    dataset.context.print_on_execution_start = False
    # decode_batch's UserError (a file that cannot be decoded, named) as itself, so that the
    # run ends on its one line; Ray Data's UserCodeException would hide it in a traceback.
    dataset.context.raise_original_map_exception = True
    dataset.set_name(STREAM_DATASET_NAME)
    quiet_stream_logs()
    return dataset


class _WithoutStreamDatasets(logging.Filter):
    """Drops Ray Data's per-dataset INFO lines about distmed's streamed datasets."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or (
            f"Dataset {STREAM_DATASET_NAME}_" not in record.getMessage()
        )


def quiet_stream_logs() -> None:
    """Keep Ray Data's start and "execution finished" lines of streamed datasets out of this
    process's logs (console and Ray Data's files); its warnings, errors and lines about any
    other dataset are kept. Idempotent."""
    from distmed._ray_compat import RAY_DATA_EXECUTOR_LOGGER

    executor = logging.getLogger(RAY_DATA_EXECUTOR_LOGGER)
    if not any(isinstance(f, _WithoutStreamDatasets) for f in executor.filters):
        executor.addFilter(_WithoutStreamDatasets())


def window_rows(window: int, batch_size: int) -> int:
    """Rows per dataset: `window` (StreamSpec.window) rounded down to whole batches, at least
    one batch, so that only the last window of a pass ends in a partial batch."""
    return batch_size * max(1, window // batch_size)


def window_datasets(
    spec: StreamSpec, positions: np.ndarray, batch_size: int, decoder: Any = decode_batch
) -> Iterator[Any]:
    """`stream_dataset` of each consecutive window of `positions` (`window_rows` each), in
    order; each is built when the one before has been read. A read window's blocks are
    released (`_release_read_windows`) at most every RELEASE_EVERY_S."""
    step = window_rows(spec.window, batch_size)
    released = time.monotonic()
    for start in range(0, len(positions), step):
        dataset = stream_dataset(spec, positions[start : start + step], decoder)
        yield dataset
        del dataset
        if time.monotonic() - released >= RELEASE_EVERY_S:
            _release_read_windows()
            released = time.monotonic()


def _release_read_windows() -> None:
    # A read Ray Data dataset keeps its input blocks (its rows' positions and paths) in the
    # object store through reference cycles, until Python's full garbage collection, which a
    # Train worker's heap makes rare and ~0.1 s long: measured, a window's blocks piled up
    # per window until one ran, so the store's peak grew with the epoch's length.
    gc.collect()


def stream_batches(
    spec: StreamSpec, positions: np.ndarray, batch_size: int, pin_memory: bool = False
) -> Iterator[tuple[Any, Any]]:
    """(uint8 images (B, 3, S, S), pool positions (B,)) torch batches of `positions`, in that
    order, decoded by Ray Data tasks across the cluster while the caller trains on the last.
    Every batch has `batch_size` rows but the last. The object store holds at most two
    windows' rows and the pixels in flight, whatever len(positions) is.

    Needs a running Ray session (a Train worker has one).

    Raises:
        UserError: a file cannot be decoded (`decode_batch`), when its batch is reached.
    """
    if len(positions) == 0:
        return iter(())

    def batches() -> Iterator[dict[str, Any]]:
        for dataset in window_datasets(spec, positions, batch_size):
            yield from dataset.iter_torch_batches(
                batch_size=batch_size,
                prefetch_batches=spec.prefetch_batches,
                device="cpu",  # the loop moves and augments the batch on the training device
                pin_memory=pin_memory,
            )

    return ((b["image"], b["position"]) for b in read_ahead(batches(), spec.prefetch_batches))


Item = TypeVar("Item")


def read_ahead(items: Iterable[Item], depth: int) -> Iterator[Item]:
    """`items`, produced by a thread up to `depth` ahead of the consumer: while the caller
    works on the last batches of one window, the next window's decoding has started.

    The producer's exception is raised in the consumer at its place in the sequence. A
    consumer that stops early (closes the generator, or it is collected) stops the thread,
    which closes `items` (ending a Ray Data iteration).
    """
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def offer(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not offer(("item", item)):
                    break
            else:
                offer(("end", None))
        except BaseException as error:  # handed to the consumer, raised there
            offer(("error", error))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="distmed-stream-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=1.0)  # a producer waiting on Ray Data sees `stop` at its next item
