"""Synthetic long-context retrieval tasks, generated on the fly (nothing is downloaded).

A sequence is ``BOS``, a haystack of random filler tokens with ``num_needles`` needles planted in
it, then ``num_queries`` queries::

    BOS  f f f  KEY k1 v1  f f f ... f  KEY k2 v2  f f   QUERY k2 v2  QUERY k1 v1
         |<------------------ haystack --------------->|<---- queries ---->|

Keys, values and filler come from disjoint token ranges, so a key token appears exactly twice:
in its needle and in its query. The model must predict each query's value token (the only
supervised targets; filler is unpredictable noise by construction). Answering needs an induction
circuit: the query's key finds the needle holding the same key and copies the token after it
(the model's token shift, :class:`nsa.models.RetrievalLM`, makes that one attention hop); for NSA at long context the compressed branch must score the needle's block so that the
selection branch reads it (the sliding window cannot see a deep needle).

- key-value retrieval: ``num_needles = num_queries = 1``;
- multi-key: ``num_needles > 1`` needles with distinct keys; ``num_queries`` of them are asked
  (the rest are distractors), in random order.

Depth: a needle at depth ``p`` (0..1) starts at haystack offset ``round(p * (H - 3))`` where
``H`` is the haystack length, so depth 0 is right after ``BOS`` and depth 1 ends right before the
first query. Everything is drawn from a CPU ``torch.Generator``: the same seed gives the same
batch on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, BOS, KEY, QUERY = 0, 1, 2, 3
NUM_SPECIAL = 8  # ids 4..7 are reserved, so token ranges do not shift if a marker is added
NEEDLE_LEN = 3  # KEY k v
QUERY_LEN = 3  # QUERY k v (v is the target at k's position)
IGNORE = -100  # target id that cross-entropy skips


@dataclass(frozen=True)
class RetrievalTask:
    """One retrieval task family.

    Attributes:
        num_keys: distinct key tokens (``>= num_needles``: keys within a sequence are distinct).
        num_values: distinct value tokens; chance accuracy is ``1 / num_values``.
        num_filler: distinct filler tokens of the haystack.
        num_needles: needles planted per sequence.
        num_queries: needles asked at the end (``1 <= num_queries <= num_needles``).
        adjacent_rate: fraction of sequences (drawn per sequence) whose first asked needle ends
            right before the queries (depth 1) when no depth is given; the other needles stay
            uniform. Why: with needles placed uniformly, a needle next to the query occurs in
            about 4 of 8,192 placements, and the H200 models trained that way answered it in
            12-50% of sequences at their own training context (docs/TRAINING.md). 0 (default)
            draws nothing extra, so batches are the same as without the option.
    """

    num_keys: int = 64
    num_values: int = 64
    num_filler: int = 128
    num_needles: int = 1
    num_queries: int = 1
    adjacent_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_keys", "num_values", "num_filler", "num_needles", "num_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RetrievalTask.{name} must be a positive int, got {value!r}")
        if self.num_keys < self.num_needles:
            raise ValueError(f"RetrievalTask.num_keys must be >= num_needles (keys in a sequence are "
                             f"distinct), got num_keys={self.num_keys}, num_needles={self.num_needles}")
        if self.num_queries > self.num_needles:
            raise ValueError(f"RetrievalTask.num_queries must be <= num_needles, got "
                             f"num_queries={self.num_queries}, num_needles={self.num_needles}")
        rate = self.adjacent_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"RetrievalTask.adjacent_rate must be a fraction in [0, 1], got {rate!r}")

    @property
    def key_start(self) -> int:
        return NUM_SPECIAL

    @property
    def value_start(self) -> int:
        return NUM_SPECIAL + self.num_keys

    @property
    def filler_start(self) -> int:
        return NUM_SPECIAL + self.num_keys + self.num_values

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + self.num_keys + self.num_values + self.num_filler

    def haystack_len(self, context: int) -> int:
        """Haystack tokens of a ``context``-token input (``BOS`` and queries excluded)."""
        return context - QUERY_LEN * self.num_queries

    def min_context(self) -> int:
        """The shortest context that fits ``BOS``, the needles and the queries."""
        return QUERY_LEN * self.num_queries + NEEDLE_LEN * self.num_needles + 1

    def replace(self, **changes) -> RetrievalTask:
        import dataclasses

        return dataclasses.replace(self, **changes)


@dataclass
class RetrievalBatch:
    """A batch of task sequences (CPU tensors; ``.to(device)`` moves them).

    Attributes:
        tokens: int64 ``[B, T]`` model input (``T`` = the context).
        targets: int64 ``[B, T]`` next-token labels: the value token at each query's key
            position, ``IGNORE`` (-100) elsewhere.
        answer_positions: int64 ``[B, Q]`` positions in ``tokens`` whose next token is an answer,
            in query order.
        answers: int64 ``[B, Q]`` the value token expected at each answer position.
        needle_starts: int64 ``[B, Q]`` where the needle asked by each query starts in ``tokens``.
        depths: float64 ``[B, Q]`` each asked needle's depth in the haystack (0..1).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    answer_positions: torch.Tensor
    answers: torch.Tensor
    needle_starts: torch.Tensor
    depths: torch.Tensor

    def to(self, device: torch.device | str) -> RetrievalBatch:
        return RetrievalBatch(*(getattr(self, name).to(device) for name in (
            "tokens", "targets", "answer_positions", "answers", "needle_starts", "depths")))


def _needle_offsets(haystack: int, count: int, gen: torch.Generator, fixed: int | None) -> list[int]:
    """``count`` non-overlapping needle offsets in a haystack; the first is ``fixed`` if given.

    Without ``fixed``: sorted gaps by stars and bars (uniform over placements), then shuffled so
    that needle 0 (the one asked first) is not always the shallowest. With ``fixed``: each other
    needle starts uniformly among the offsets where it still fits.
    """
    if fixed is None:
        free = haystack - NEEDLE_LEN * count
        cuts = sorted(torch.randint(0, free + 1, (count,), generator=gen).tolist())
        offsets = [cut + NEEDLE_LEN * i for i, cut in enumerate(cuts)]
        order = torch.randperm(count, generator=gen).tolist()
        return [offsets[i] for i in order]
    taken = torch.zeros(haystack, dtype=torch.bool)
    taken[fixed: fixed + NEEDLE_LEN] = True
    offsets = [fixed]
    for _ in range(count - 1):
        fits = ~taken[: haystack - NEEDLE_LEN + 1].clone()
        for shift in range(1, NEEDLE_LEN):
            fits &= ~taken[shift: haystack - NEEDLE_LEN + 1 + shift]
        starts = fits.nonzero().flatten()
        if starts.numel() == 0:
            raise ValueError(f"no room for {count} needles in a haystack of {haystack} tokens")
        start = int(starts[torch.randint(0, starts.numel(), (1,), generator=gen)])
        taken[start: start + NEEDLE_LEN] = True
        offsets.append(start)
    return offsets


def make_batch(task: RetrievalTask, batch_size: int, context: int, seed: int | torch.Generator,
               *, depth: float | None = None) -> RetrievalBatch:
    """Draw ``batch_size`` sequences of ``context`` tokens.

    Args:
        task: the :class:`RetrievalTask`.
        batch_size: sequences ``B``.
        context: tokens per sequence ``T`` (``>= task.min_context()``).
        seed: an int seed or a CPU ``torch.Generator`` (advanced in place, for a stream of batches).
        depth: where the needle asked by the first query sits (0..1); ``None``: every needle at a
            uniformly random place (but see ``task.adjacent_rate``).

    Returns:
        a :class:`RetrievalBatch` on the CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(context, bool) or not isinstance(context, int) or context < task.min_context():
        raise ValueError(f"context must be an int >= {task.min_context()} for {task}, got {context!r}")
    if depth is not None and not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (fraction of the haystack) or None, got {depth!r}")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    haystack = task.haystack_len(context) - 1  # position 0 is BOS
    queries, needles = task.num_queries, task.num_needles
    seq = torch.randint(task.filler_start, task.vocab_size, (batch_size, context + 1), generator=gen)
    seq[:, 0] = BOS
    fixed = None if depth is None else round(float(depth) * (haystack - NEEDLE_LEN))
    answer_positions = torch.empty(batch_size, queries, dtype=torch.int64)
    answers = torch.empty(batch_size, queries, dtype=torch.int64)
    needle_starts = torch.empty(batch_size, queries, dtype=torch.int64)
    query_start = 1 + haystack
    for row in range(batch_size):
        keys = task.key_start + torch.randperm(task.num_keys, generator=gen)[:needles]
        values = task.value_start + torch.randint(0, task.num_values, (needles,), generator=gen)
        # Rate 0 draws nothing, so batches stay those of a task without the option.
        adjacent = fixed is None and task.adjacent_rate > 0 and (
            float(torch.rand((), generator=gen)) < task.adjacent_rate)
        row_fixed = haystack - NEEDLE_LEN if adjacent else fixed  # depth 1: ends right before the query
        offsets = _needle_offsets(haystack, needles, gen, row_fixed)
        for key, value, offset in zip(keys.tolist(), values.tolist(), offsets):
            seq[row, 1 + offset: 1 + offset + NEEDLE_LEN] = torch.tensor([KEY, key, value])
        # Query i asks needle i: needle 0 is the one placed at `depth`.
        for i in range(queries):
            at = query_start + QUERY_LEN * i
            seq[row, at: at + QUERY_LEN] = torch.tensor([QUERY, keys[i], values[i]])
            answer_positions[row, i] = at + 1  # the query's key: its next token is the value
            answers[row, i] = values[i]
            needle_starts[row, i] = 1 + offsets[i]
    tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:]
    targets = torch.full_like(tokens, IGNORE)
    targets.scatter_(1, answer_positions, labels.gather(1, answer_positions))
    depths = (needle_starts - 1).double() / max(1, haystack - NEEDLE_LEN)
    return RetrievalBatch(tokens, targets, answer_positions, answers, needle_starts, depths)


class BatchStream:
    """The training batches of one generator, in order, each next one drawn on a background
    thread while the current step trains.

    Drawing is CPU work (16 x 8,192 tokens: about 2 ms on an idle core, 16 ms measured on a busy
    2 x H200 host) that a training loop which reads its loss back every step otherwise waits for
    once per step. The batches are exactly those of ``make_batch(task, batch_size, c_k, gen)`` for
    each step's context ``c_k`` in turn: the next batch is drawn for the last step's context (the
    usual case); when a step asks for another one, that draw is dropped and the generator rewound
    to where it was, so the stream never depends on the guess.

    Args:
        task, batch_size: as for :func:`make_batch`.
        gen: the CPU generator the batches come from; the stream owns it from now on (read its
            position with :meth:`state`).
    """

    def __init__(self, task: RetrievalTask, batch_size: int, gen: torch.Generator):
        from concurrent.futures import ThreadPoolExecutor

        self.task, self.batch_size, self._gen = task, batch_size, gen
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-stream")
        self._state = gen.get_state()  # the generator after the batches handed out
        self._pending = None  # (context, future) of the draw under way

    def next(self, context: int) -> RetrievalBatch:
        """The batch of the next step, at ``context`` tokens."""
        if self._pending is not None:
            drawn_for, future = self._pending
            batch = future.result()  # also lets a dropped draw finish before the rewind
            if drawn_for != context:
                self._gen.set_state(self._state)
                batch = make_batch(self.task, self.batch_size, context, self._gen)
        else:
            batch = make_batch(self.task, self.batch_size, context, self._gen)
        self._state = self._gen.get_state()
        draw = self._pool.submit(make_batch, self.task, self.batch_size, context, self._gen)
        self._pending = (context, draw)
        return batch

    def state(self) -> torch.Tensor:
        """The generator's state after the batches handed out so far (what a checkpoint saves:
        ``torch.Generator().set_state(stream.state())`` continues the stream)."""
        return self._state.clone()

    def close(self) -> None:
        """Finish the draw under way and stop the thread."""
        if self._pending is not None:
            self._pending[1].result()
            self._pending = None
        self._pool.shutdown()


@dataclass(frozen=True)
class RetrievalCount:
    """What :func:`retrieval_accuracy` measured.

    Attributes:
        correct, total: sequences whose first query was answered right, and sequences evaluated.
        needle_selected: per NSA layer (in depth order; empty unless asked for, or for a model
            without NSA layers), how many sequences had a block holding part of the asked needle
            among the blocks selected at the answer position by at least one KV head. Separates
            the two ways retrieval fails: scoring that never reads the needle, and a read that
            is not turned into the answer.
    """

    correct: int
    total: int
    needle_selected: tuple[int, ...] = ()

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def needle_block_selected(selected_blocks: torch.Tensor, batch: RetrievalBatch,
                          select_block: int, query: int = 0) -> torch.Tensor:
    """bool ``[B]``: whether any KV head selected a block overlapping the needle of query
    ``query`` (default the first) at that query's answer position.

    ``selected_blocks`` is one layer's :attr:`nsa.NSAInfo.selected_blocks`, int64 ``[B, T, HK, n]``
    (``-1`` padded); ``select_block`` is the selection block size ``l'``.
    """
    rows = torch.arange(selected_blocks.shape[0], device=selected_blocks.device)
    chosen = selected_blocks[rows, batch.answer_positions[:, query]]  # [B, HK, n]
    first = (batch.needle_starts[:, query] // select_block)[:, None, None]
    last = ((batch.needle_starts[:, query] + NEEDLE_LEN - 1) // select_block)[:, None, None]
    return ((chosen >= first) & (chosen <= last)).flatten(1).any(1)


@torch.no_grad()
def retrieval_accuracy(model: torch.nn.Module, task: RetrievalTask, context: int, depth: float | None,
                       *, num_samples: int, batch_size: int, seed: int,
                       device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                       needle_selection: bool = False) -> RetrievalCount:
    """How many of ``num_samples`` sequences' first query the model answers (greedy argmax).

    ``model(tokens, logits_at=positions)`` must return logits ``[B, Q, vocab]`` at the given
    positions (see :class:`nsa.models.RetrievalLM`). Only the first query is scored: with
    ``depth`` given, it is the one asking the needle planted at that depth.

    Args:
        model: the language model (put in eval mode by the caller).
        task, context, depth: as in :func:`make_batch`.
        num_samples: sequences evaluated; batches of ``batch_size``.
        seed: the data seed (the same seed gives the same sequences for every model).
        device: where the model runs; ``autocast_dtype``: autocast dtype on CUDA, or None.
        needle_selection: also count, per NSA layer, the sequences whose needle was among the
            selected blocks (``model`` must be a :class:`nsa.models.RetrievalLM`; it then
            collects each layer's :class:`nsa.NSAInfo`).

    Returns:
        a :class:`RetrievalCount`.
    """
    gen = torch.Generator().manual_seed(int(seed))
    correct = total = 0
    selected: list[int] = []
    device = torch.device(device)
    while total < num_samples:
        size = min(batch_size, num_samples - total)
        batch = make_batch(task, size, context, gen, depth=depth).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            # collect_info only when asked: other models (the tests' oracles) take no such argument
            logits = model(batch.tokens, logits_at=batch.answer_positions[:, :1],
                           **({"collect_info": True} if needle_selection else {}))
        predicted = logits[:, 0].argmax(dim=-1)
        correct += int((predicted == batch.answers[:, 0]).sum())
        total += size
        if needle_selection:
            infos = [info for info in model.last_infos if info is not None]
            select_block = model.config.nsa.select_block
            hits = [int(needle_block_selected(info.selected_blocks, batch, select_block).sum())
                    for info in infos]
            selected = hits if not selected else [a + b for a, b in zip(selected, hits)]
            model.last_infos = []  # [B, T, HK, n] per layer: not kept past the count
    return RetrievalCount(correct, total, tuple(selected))
