"""The training data stream: mix datasets by ratio, decode and augment, skip bad samples, batch.

Everything a batch contains is a pure function of (seed, micro-batch index, rank, world size), and for
streamed shards also the worker count. That is what makes resume exact without replaying data: a
resumed run builds the stream at micro-batch `start` and gets the very batches the uninterrupted run
would have seen. Concretely:

* which dataset micro-batch `b` comes from is a hash of (seed, b) against the mixing ratios, the
  same on every rank (the reference draws each batch from one dataset);
* map-style datasets (JSONL, COCO) are shuffled per epoch by a keyed Feistel permutation, computed
  per index, so no O(rows) index array exists in any process; rank r takes every W-th position;
* streamed shards (WebDataset) are split over (rank, worker) slots and read in order; on resume a
  slot skips the records it already consumed without decoding them;
* each sample's augmentation draws from a generator seeded by (seed, dataset, epoch, row), so it is
  identical whatever the number of processes or workers.

A bad sample (missing file, corrupt image, empty caption) is dropped from its batch and counted; the
trainer decides when there are too many.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from evlgen.config import Config, ConfigError, DatasetConfig
from evlgen.data.features import FeatureRecord
from evlgen.data.sources import Record, RecordError, get_or_error, is_streaming, iter_records, open_source
from evlgen.data.transforms import ImageLoadError, ImageTransform, load_image

log = logging.getLogger(__name__)

_M64 = (1 << 64) - 1
# Enough examples to diagnose a broken dataset without bloating every batch sent between processes.
MAX_BAD_EXAMPLES = 4


# -------------------------------------------------------------------------------------------------
# Counter-based randomness: pure functions of their arguments, no generator state to save.


def mix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def derive(*parts: int) -> int:
    """A 64-bit key from a tuple of non-negative integers (order matters)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = mix64(h ^ (p & _M64))
    return h


def permute(i: int, n: int, key: int) -> int:
    """The i-th element of a pseudo-random permutation of range(n), selected by key.

    A balanced Feistel network over the smallest 4^h >= n, cycle-walking back into range: a bijection
    computed per index in O(1) memory (a shuffled index array would cost 8 bytes per row per worker).
    """
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a permutation of {n}")
    if n == 1:
        return 0
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    round_keys = [derive(key, r) for r in range(6)]
    x = i
    while True:
        left, right = x >> half, x & mask
        for k in round_keys:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        x = (left << half) | right
        if x < n:
            return x


def mixing_choice(b: int, cumulative: Sequence[float], seed: int) -> int:
    """Which dataset micro-batch b is drawn from, given cumulative normalised weights."""
    if len(cumulative) == 1:
        return 0
    u = derive(seed, 0x6D6978, b) / 2.0**64
    for d, c in enumerate(cumulative):
        if u < c:
            return d
    return len(cumulative) - 1


def cumulative_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"mixing weights must be non-negative with a positive sum, got {list(weights)}")
    out, acc = [], 0.0
    for w in weights:
        acc += w / total
        out.append(acc)
    out[-1] = 1.0
    return out


def sample_generator(*parts: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (the only source of augmentation randomness)."""
    return torch.Generator().manual_seed(derive(*parts) >> 1)


# -------------------------------------------------------------------------------------------------
# Samples and batches


@dataclass
class Batch:
    """One micro-batch; `pixels` or `features` is set (features come from a frozen-feature cache)."""

    index: int
    dataset: int
    prompts: list[str]
    targets: list[str]
    keys: list[str]
    pixels: Tensor | None = None  # [B, T, 3, H, W]
    features: Tensor | None = None  # [B, N, D]
    num_bad: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # first (location, reason) pairs

    def __len__(self) -> int:
        return len(self.targets)

    def pin_memory(self) -> Batch:
        # Called by DataLoader(pin_memory=True) on custom batch types.
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        if self.features is not None:
            self.features = self.features.pin_memory()
        return self


class SampleError(Exception):
    """A record whose text cannot be used (e.g. a VQA row without answers)."""


@dataclass(frozen=True)
class SampleMaker:
    """Record -> (pixels [T, 3, H, W], prompt, target), with all randomness from one generator."""

    transform: ImageTransform
    caption_prompt: str
    vqa_prompt: str
    frames: int
    max_pixels: int
    frame_sampling: str = "segments"

    def text(self, rec: Record, g: torch.Generator | None) -> tuple[str, str]:
        if rec.question is not None:
            answers = [a.strip() for a in rec.answers if a and a.strip()]
            if not answers:
                raise SampleError("no non-empty answer")
            # Frequent answers are drawn more often, like the reference's answer weighting.
            counts = Counter(answers)
            choices = sorted(counts)
            weights = torch.tensor([counts[a] for a in choices], dtype=torch.float64)
            if g is None:  # eval: the most frequent answer (ties: alphabetical)
                i = int(torch.argmax(weights).item())
            else:
                i = int(torch.multinomial(weights, 1, generator=g).item())
            return format_prompt(self.vqa_prompt, rec.question), choices[i]
        captions = [c.strip() for c in rec.captions if c and c.strip()]
        if not captions:
            raise SampleError("empty caption")
        i = 0 if g is None else int(torch.randint(len(captions), (), generator=g).item())
        return self.caption_prompt, captions[i]

    def pixels(self, rec: Record, g: torch.Generator | None) -> Tensor:
        if rec.video is not None:
            from evlgen.data.video import load_video_frames

            frames = load_video_frames(
                rec.video,
                self.frames,
                train=self.transform.train,
                generator=g,
                max_pixels=self.max_pixels,
                mode=self.frame_sampling,
                name=rec.location if isinstance(rec.video, bytes) else None,
            )
            # One crop and flip for the whole clip: per-frame augmentation would fake motion.
            state = g.get_state() if g is not None else None
            out = []
            for f in frames:
                if g is not None:
                    g.set_state(state)
                out.append(self.transform(f, g))
            return torch.stack(out)  # [T, 3, H, W]
        if rec.image is None:
            raise SampleError("no image")
        image = load_image(rec.image, self.max_pixels, name=rec.location)
        return self.transform(image, g).unsqueeze(0)  # [1, 3, H, W]

    def __call__(self, rec: Record, g: torch.Generator | None) -> tuple[Tensor, str, str]:
        prompt, target = self.text(rec, g)
        return self.pixels(rec, g), prompt, target


def format_prompt(template: str, question: str) -> str:
    return template.format(question) if "{}" in template else f"{template}{question}"


def make_sample_maker(cfg: Config, image_size: int, train: bool) -> SampleMaker:
    d = cfg.data
    transform = ImageTransform(
        image_size=image_size,
        mean=cfg.vision.image_mean,
        std=cfg.vision.image_std,
        train=train,
        scale=d.crop_scale,
        hflip=d.hflip,
        eval_resize=d.eval_resize,
    )
    return SampleMaker(
        transform, cfg.caption.prompt, cfg.vqa.prompt, d.frames, d.max_pixels, d.frame_sampling
    )


def collate(
    index: int,
    dataset: int,
    items: list[tuple[Tensor, str, str, str]],
    bad: list[tuple[str, str]],
) -> Batch:
    """Stack good samples; images among videos are repeated to T frames (the frame mean is unchanged)."""
    batch = Batch(
        index=index,
        dataset=dataset,
        prompts=[it[1] for it in items],
        targets=[it[2] for it in items],
        keys=[it[3] for it in items],
        num_bad=len(bad),
        bad=bad[:MAX_BAD_EXAMPLES],
    )
    if items and items[0][0].ndim == 2:  # cached tower features (one dataset never mixes the two)
        batch.features = torch.stack([it[0] for it in items])  # [B, N, D]
    elif items:
        t = max(it[0].shape[0] for it in items)
        batch.pixels = torch.stack([it[0].expand(t, -1, -1, -1) for it in items])  # [B, T, 3, H, W]
    return batch


def load_one(maker: SampleMaker, rec: Record | RecordError, g: torch.Generator | None) -> tuple[Any, Any]:
    """(item, None) for a good sample, (None, (location, reason)) for a bad one."""
    if isinstance(rec, RecordError):
        return None, _problem(getattr(rec, "location", "?"), rec)
    if isinstance(rec, FeatureRecord):
        try:
            prompt, target = maker.text(rec, g)
        except SampleError as e:
            return None, _problem(rec.location, e)
        k = rec.features.shape[0]
        view = 0 if k == 1 or g is None else int(torch.randint(k, (), generator=g).item())
        return (rec.features[view], prompt, target, rec.key), None  # [N, D]
    try:
        pixels, prompt, target = maker(rec, g)
    except (ImageLoadError, SampleError, OSError) as e:
        return None, _problem(rec.location, e)
    return (pixels, prompt, target, rec.key), None


def _problem(location: str, error: Exception) -> tuple[str, str]:
    reason = str(error)
    # Readers already prefix their messages with the location; keep it once.
    return location, reason.removeprefix(f"{location}: ")


# -------------------------------------------------------------------------------------------------
# The stream


class TrainStream(IterableDataset):
    """Infinite micro-batches from `start` on, for one rank; each DataLoader worker makes every nw-th."""

    def __init__(
        self,
        sources: Sequence[Any],
        weights: Sequence[float],
        maker: SampleMaker,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        super().__init__()
        self.sources = list(sources)
        self.cumulative = cumulative_weights(weights)
        self.maker = maker
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        for d, src in enumerate(self.sources):
            if not is_streaming(src) and len(src) < world_size:
                raise ValueError(
                    f"training dataset {d} has {len(src)} rows, fewer than {world_size} processes"
                )

    def dataset_of(self, b: int) -> int:
        return mixing_choice(b, self.cumulative, self.seed)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batch `start` from worker 0, then round-robin. Batch b belongs to the
        # virtual worker b % num_workers (which fixes what a shard slot reads, run after run), so
        # physical worker w plays virtual worker (w + start) % num_workers.
        worker = (worker + self.start) % num_workers
        # Per-dataset batch counters: map-style counts this rank's batches, streams this worker's.
        rank_batches = [0] * len(self.sources)
        worker_batches = [0] * len(self.sources)
        for b in range(self.start):
            d = self.dataset_of(b)
            rank_batches[d] += 1
            worker_batches[d] += b % num_workers == worker
        slot = self.rank * num_workers + worker
        streams = {
            d: self._stream_records(
                d, slot, self.world_size * num_workers, worker_batches[d] * self.batch_size
            )
            for d, src in enumerate(self.sources)
            if is_streaming(src)
        }
        for b in itertools.count(self.start):
            d = self.dataset_of(b)
            mine = b % num_workers == worker
            if mine:
                if d in streams:
                    yield self._stream_batch(b, d, slot, streams[d])
                else:
                    yield self._map_batch(b, d, rank_batches[d])
            rank_batches[d] += 1

    # map-style: position p of this rank's share is row permute(rank + W * (p mod L), N) of epoch p // L
    def _map_batch(self, b: int, d: int, k: int) -> Batch:
        src = self.sources[d]
        n = len(src)
        share = n // self.world_size  # every rank gets the same count; the tail of an epoch is dropped
        items, bad = [], []
        for p in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, offset = divmod(p, share)
            row = permute(self.rank + self.world_size * offset, n, derive(self.seed, d, epoch))
            g = sample_generator(self.seed, d, epoch, row)
            item, problem = load_one(self.maker, get_or_error(src, row), g)
            if item is not None:
                items.append(item)
            else:
                bad.append(problem)
        return collate(b, d, items, bad)

    def _stream_records(self, d: int, slot: int, slots: int, skip: int) -> Iterator[tuple[int, int, Any]]:
        """(epoch, position, record) for one rank x worker slot, forever, after skipping `skip` records."""
        src = self.sources[d]
        shards = list(src.shards)
        if len(shards) < slots:
            log.warning(
                "dataset %d has %d shards for %d rank x worker slots: every slot reads every shard and "
                "keeps its share of samples (add shards to avoid the extra reading)",
                d,
                len(shards),
                slots,
            )

        def epoch_records(epoch: int) -> Iterator[Any]:
            key = derive(self.seed, d, epoch)
            order = [shards[permute(i, len(shards), key)] for i in range(len(shards))]
            if len(shards) >= slots:
                for shard in order[slot::slots]:
                    yield from src.iter_shard(shard)
            else:
                stream = (r for shard in order for r in src.iter_shard(shard))
                yield from itertools.islice(stream, slot, None, slots)

        position = 0
        for epoch in itertools.count():
            empty = True
            for rec in epoch_records(epoch):
                empty = False
                if position >= skip:
                    yield epoch, position, rec
                position += 1
            if empty:
                raise ValueError(f"training dataset {d} yields no samples for slot {slot} of {slots}")

    def _stream_batch(self, b: int, d: int, slot: int, records: Iterator[tuple[int, int, Any]]) -> Batch:
        items, bad = [], []
        for epoch, position, rec in itertools.islice(records, self.batch_size):
            item, problem = load_one(self.maker, rec, sample_generator(self.seed, d, epoch, slot, position))
            if item is not None:
                items.append(item)
            else:
                bad.append(problem)
        return collate(b, d, items, bad)


def open_sources(
    datasets: Sequence[DatasetConfig], cache_dir: str | None = None, key: str = "data.train"
) -> list[Any]:
    """Open every dataset; a missing or unreadable one is a ConfigError naming its config key."""
    if not datasets:
        raise ConfigError(f"no training data: set {key} to a list of datasets (see docs/data.md)")
    out = []
    for i, ds in enumerate(datasets):
        try:
            out.append(open_source(ds, cache_dir))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}[{i}] ({ds.path}): {e}") from e
    return out


def make_loader(stream: TrainStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the stream that never touches the global RNG (exact resume depends on it)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        # Without an explicit generator the loader seeds its workers from the global RNG.
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
    )


def fixed_batches(source: Any, maker: SampleMaker, n: int, batch_size: int) -> tuple[list[Batch], int]:
    """The first n good samples of a dataset, eval transforms, as batches; also the bad-sample count."""
    items, bad = [], []
    for rec in iter_records(source):
        if len(items) >= n:
            break
        item, problem = load_one(maker, rec, None)
        if item is not None:
            items.append(item)
        else:
            bad.append(problem)
    batches = [
        collate(-1, 0, items[i : i + batch_size], bad if i == 0 else [])
        for i in range(0, len(items), batch_size)
    ]
    return batches, len(bad)
