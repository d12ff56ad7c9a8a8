"""N-way K-shot task sampling, a whole meta-batch at a time, on the device.

A split is one tensor ``images`` of shape ``[C, N, ch, H, W]`` (C classes, N
drawings each) that lives on the training device. A meta-batch of ``T`` tasks
is then a handful of tensor ops there:

1. classes: ``way`` of the C classes without replacement per task, as the top
   ``way`` of T rows of uniform keys;
2. drawings: ``shot + query`` of the N drawings without replacement per
   (task, class), the same way, so support and query never share a drawing;
3. optional class augmentation: one rotation ``k * 90 deg`` per (task, class);
4. one advanced-indexing gather that reads the pixels, with the rotation folded
   into the pixel index (no per-image Python, no PIL, no host sync).

All randomness comes from one ``torch.Generator`` on the device, so
``state_dict`` / ``load_state_dict`` resume the exact task stream.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import torch

__all__ = ["TaskIndices", "TaskSampler", "Tasks"]

# Tasks drawn per random call in eval_tasks. Fixed so that the evaluation tasks
# for a seed do not depend on the batch size the caller evaluates with.
_EVAL_CHUNK = 64

Tasks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class TaskIndices(NamedTuple):
    """Which images make up a meta-batch (all int64, on the sampler's device).

    Attributes:
        classes: ``[T, way]`` rows of ``images``; task label ``j`` is ``classes[:, j]``.
        drawings: ``[T, way, shot + query]`` drawings of each class; the first
            ``shot`` are the support set, the rest the query set.
        rotations: ``[T, way]`` quarter turns ``k`` in 0..3 applied to every
            image of that class (as ``torch.rot90(img, k, dims=(-2, -1))``);
            all zero when the sampler does not rotate.
    """

    classes: torch.Tensor
    drawings: torch.Tensor
    rotations: torch.Tensor


class TaskSampler:
    """Sample meta-batches of ``way``-way, ``shot``-shot tasks from one split.

    Args:
        images: ``[C, N, ch, H, W]`` float32 (used as is) or uint8 (scaled by
            1/255 when gathered, which keeps a large split 4x smaller on the
            device). Moved to ``device`` once, here.
        way: classes per task (labels ``0..way-1``).
        shot: support drawings per class.
        query: query drawings per class (0 allowed).
        rotate: rotate each sampled class of each task by a random multiple of
            90 degrees (the Omniglot class augmentation); needs ``H == W``.
        device: where images live and tasks are built; None keeps
            ``images.device``.
        seed: seed of the sampler's generator.

    ``sample(T)`` returns ``(x_s, y_s, x_q, y_q)``:

    * ``x_s``: ``[T, way*shot, ch, H, W]`` float32, ``y_s``: ``[T, way*shot]`` int64;
    * ``x_q``: ``[T, way*query, ch, H, W]`` float32, ``y_q``: ``[T, way*query]`` int64;

    class-major: ``y_s[t] = [0]*shot + [1]*shot + ... + [way-1]*shot``.

    Raises:
        ValueError: ``shot + query`` exceeds the drawings per class, ``way``
            exceeds the classes, a bad shape, or ``rotate`` with ``H != W``.

    Example:
        >>> s = TaskSampler(torch.rand(1200, 20, 1, 28, 28), way=5, shot=1, query=15, rotate=True)
        >>> x_s, y_s, x_q, y_q = s.sample(32)
        >>> x_s.shape, y_q.shape
        (torch.Size([32, 5, 1, 28, 28]), torch.Size([32, 75]))
    """

    def __init__(
        self,
        images: torch.Tensor,
        way: int,
        shot: int,
        query: int,
        *,
        rotate: bool = False,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 5:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [C, N, ch, H, W], got {shape}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
        C, N, _, H, W = images.shape
        for name, value, low in (("way", way, 1), ("shot", shot, 1), ("query", query, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if way > C:
            raise ValueError(f"way={way} exceeds the {C} classes of this split")
        if shot + query > N:
            raise ValueError(
                f"shot + query = {shot} + {query} = {shot + query} exceeds the {N} drawings "
                f"per class; support and query drawings are sampled without replacement"
            )
        if rotate and H != W:
            raise ValueError(f"rotate=True needs square images, got H={H}, W={W}")

        self.images = images.to(device).contiguous()
        self.device = self.images.device
        self.way, self.shot, self.query, self.rotate = way, shot, query, bool(rotate)
        self.seed = int(seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.tasks_drawn = 0
        if self.rotate:
            # rot[k] is the flat source pixel of each output pixel of
            # torch.rot90(img, k): gathering with it rotates while copying.
            base = torch.arange(H * W, device=self.device).view(H, W)
            self._rot_index = torch.stack([torch.rot90(base, k, dims=(0, 1)).reshape(-1) for k in range(4)])
            self._channels = torch.arange(images.shape[2], device=self.device)

    @property
    def num_classes(self) -> int:
        """Classes in the split (C)."""
        return self.images.shape[0]

    @property
    def num_drawings(self) -> int:
        """Drawings per class (N)."""
        return self.images.shape[1]

    def __repr__(self) -> str:
        C, N, ch, H, W = self.images.shape
        return (
            f"TaskSampler(classes={C}, drawings={N}, image={ch}x{H}x{W}, way={self.way}, "
            f"shot={self.shot}, query={self.query}, rotate={self.rotate}, device={self.device})"
        )

    # ------------------------------------------------------------------ sampling

    def draw(self, T: int, generator: torch.Generator | None = None) -> TaskIndices:
        """Draw the indices of ``T`` tasks (advances ``generator``, default the sampler's).

        Example:
            >>> idx = sampler.draw(4)
            >>> idx.classes.shape, idx.drawings.shape, idx.rotations.shape
            (torch.Size([4, 5]), torch.Size([4, 5, 16]), torch.Size([4, 5]))
        """
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"the number of tasks T must be an int >= 1, got {T!r}")
        g = self.generator if generator is None else generator
        kw = dict(generator=g, device=self.device)
        # float64 keys: among 1200 float32 keys a tie turns up in a few % of
        # tasks, and then the choice would depend on the top-k kernel.
        classes = torch.rand(T, self.num_classes, dtype=torch.float64, **kw).topk(self.way, dim=1).indices
        keys = torch.rand(T, self.way, self.num_drawings, dtype=torch.float64, **kw)
        drawings = keys.topk(self.shot + self.query, dim=2).indices
        if self.rotate:
            rotations = torch.randint(0, 4, (T, self.way), **kw)
        else:
            rotations = torch.zeros(T, self.way, dtype=torch.int64, device=self.device)
        if generator is None:
            self.tasks_drawn += T
        return TaskIndices(classes, drawings, rotations)

    def build(self, idx: TaskIndices) -> Tasks:
        """Gather the images of ``idx`` into ``(x_s, y_s, x_q, y_q)`` (see the class docstring).

        Example:
            >>> x_s, y_s, x_q, y_q = sampler.build(sampler.draw(8))
        """
        T, way = idx.classes.shape
        n = idx.drawings.shape[2]
        C, N, ch, H, W = self.images.shape
        if self.rotate:
            # One gather over [C, N, ch, H*W] with four broadcast index tensors:
            # (class, drawing, channel, rotated pixel) -> [T, way, n, ch, H*W].
            pixels = self._rot_index[idx.rotations]  # [T, way, H*W]
            x = self.images.view(C, N, ch, H * W)[
                idx.classes[:, :, None, None, None],
                idx.drawings[:, :, :, None, None],
                self._channels[None, None, None, :, None],
                pixels[:, :, None, None, :],
            ].view(T, way, n, ch, H, W)
        else:
            x = self.images[idx.classes[:, :, None], idx.drawings]  # [T, way, n, ch, H, W]
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255.0)
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        x_s = x[:, :, : self.shot].reshape(T, way * self.shot, ch, H, W)
        x_q = x[:, :, self.shot :].reshape(T, way * self.query, ch, H, W)
        labels = torch.arange(way, device=self.device).view(1, way, 1)
        y_s = labels.expand(T, way, self.shot).reshape(T, way * self.shot)
        y_q = labels.expand(T, way, self.query).reshape(T, way * self.query)
        return x_s, y_s, x_q, y_q

    def sample(self, T: int) -> Tasks:
        """Sample a meta-batch of ``T`` tasks from the sampler's generator.

        Returns:
            ``(x_s, y_s, x_q, y_q)``: float32 ``[T, way*shot, ch, H, W]``,
            int64 ``[T, way*shot]``, float32 ``[T, way*query, ch, H, W]``,
            int64 ``[T, way*query]``, all on the sampler's device.

        Example:
            >>> x_s, y_s, x_q, y_q = sampler.sample(32)
            >>> y_s[0]
            tensor([0, 1, 2, 3, 4])
        """
        return self.build(self.draw(T))

    def eval_tasks(self, num_tasks: int, batch_size: int | None = None, *, seed: int = 0) -> Iterator[Tasks]:
        """Yield a fixed, seeded sequence of ``num_tasks`` tasks in batches.

        Uses a fresh generator seeded with ``seed``, so the training stream is
        untouched and every call (and every run on the same device type)
        yields the same tasks. The tasks do not depend on ``batch_size``.

        Args:
            num_tasks: total tasks (e.g. 600 for the usual Omniglot test).
            batch_size: tasks per yielded batch (the last may be smaller);
                None yields one batch.
            seed: seed of the evaluation stream.

        Yields:
            ``(x_s, y_s, x_q, y_q)`` as :meth:`sample`.

        Example:
            >>> accs = [evaluate(*b) for b in test_sampler.eval_tasks(600, 50, seed=0)]
        """
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        batch_size = num_tasks if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        # Checked above, outside the generator, so bad arguments fail at the call.
        return self._eval_stream(num_tasks, batch_size, int(seed))

    def _eval_stream(self, num_tasks: int, batch_size: int, seed: int) -> Iterator[Tasks]:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        pending: list[TaskIndices] = []
        have, left = 0, num_tasks
        while left or have:
            if left and have < batch_size:
                n = min(_EVAL_CHUNK, left)
                pending.append(self.draw(n, generator=g))
                have, left = have + n, left - n
                continue
            merged = TaskIndices(*(torch.cat(parts) for parts in zip(*pending)))
            take = min(batch_size, have)
            yield self.build(TaskIndices(*(t[:take] for t in merged)))
            rest = TaskIndices(*(t[take:] for t in merged))
            have -= take
            pending = [rest] if have else []

    # ------------------------------------------------------------------ resume

    def _config(self) -> dict[str, Any]:
        return {
            "way": self.way,
            "shot": self.shot,
            "query": self.query,
            "rotate": self.rotate,
            "num_classes": self.num_classes,
            "num_drawings": self.num_drawings,
            "device_type": self.device.type,
        }

    def state_dict(self) -> dict[str, Any]:
        """The generator state and the configuration it is valid for.

        ``torch.save``-able. Restoring it with :meth:`load_state_dict` makes the
        next ``sample(T)`` calls return exactly what this sampler would have.

        Example:
            >>> ckpt["sampler"] = sampler.state_dict()
            >>> sampler.load_state_dict(ckpt["sampler"])  # after a restart
        """
        return {
            "version": 1,
            "generator": self.generator.get_state(),
            "seed": self.seed,
            "tasks_drawn": self.tasks_drawn,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the configuration must match.

        Raises:
            ValueError: the state comes from a sampler with another way / shot /
                query / rotate / split size or device type (its random stream
                would mean different tasks).
        """
        if state.get("version") != 1:
            raise ValueError(f"unknown TaskSampler state version {state.get('version')!r}")
        mine, theirs = self._config(), state["config"]
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs this sampler {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"sampler state does not match this sampler ({detail})")
        # get_state gives a CPU byte tensor for every device; torch.load with a
        # map_location may have moved it.
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))
        self.seed = int(state["seed"])
        self.tasks_drawn = int(state["tasks_drawn"])
