"""The tables of ``bench compile``: at the paper's shapes one row per distinct launch shape and
specialisation (:func:`collect`), over the grid one row per distinct specialisation
(:func:`collect_grid`); per-launch, per-specialisation and per-kernel markdown, the report and
the plain-data :func:`results`."""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Sequence

import torch

from ..common import machine_header
from .compiling import ARCHS, H100_SMS, compile_spec, prefetch, sm
from .recording import (CONFIGS, DTYPES, GRID_CHANNELS, GRID_SUPPORT, GRID_T, Launch, Shape, grid_shapes, launches,
                        meta_step_launches)
from .specialisation import Spec, specialise


def _shape(launch: Launch) -> str:
    t = next((a for a in launch.args if isinstance(a, torch.Tensor)), None)
    return "x".join(map(str, t.shape)) if t is not None else "-"


@dataclasses.dataclass
class Row:
    spec: Spec
    launch: Launch
    programs: int
    count: int  # launches of this (config, shape, spec) in the recorded meta-step


def collect(configs: Sequence[str] = tuple(CONFIGS), dtypes: Sequence[str] = tuple(DTYPES)) -> List[Row]:
    """One row per distinct (config, dtype, kernel, first tensor's shape, grid, specialisation)."""
    rows: Dict[tuple, Row] = {}
    for dt in dtypes:
        for cfg in configs:
            for launch in meta_step_launches(cfg, DTYPES[dt]):
                spec = specialise(launch)
                key = (cfg, dt, spec.name, _shape(launch), launch.grid, spec)
                if key in rows:
                    rows[key].count += 1
                else:
                    programs = 1
                    for g in launch.grid:
                        programs *= g
                    rows[key] = Row(spec, launch, programs, 1)
    return list(rows.values())


def specs(rows: Sequence[Row]) -> List[Spec]:
    """The distinct specialisations of ``rows``, in first-seen order."""
    return list(dict.fromkeys(r.spec for r in rows))


def markdown(rows: Sequence[Row], archs: Sequence[int] = ARCHS) -> str:
    archs = list(archs)
    head = ["kernel", "dtype", "config", "shape", "grid (programs)", "blocks", "warps"]
    for a in archs:
        head += [f"regs {sm(a)}", f"spills {sm(a)} (B)"]
    head += ["smem (B)", f"occupancy {sm(archs[0])} (blocks/SM, warps)", "launches"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: (r.spec.name, r.launch.dtype, list(CONFIGS).index(r.launch.config)
                                        if r.launch.config in CONFIGS else 99, -r.programs))
    for r in order:
        res = [compile_spec(r.spec, a) for a in archs]
        cells = [f"`{r.spec.name}`", r.launch.dtype, r.launch.config, _shape(r.launch),
                 f"{'x'.join(map(str, r.launch.grid))} ({r.programs})", r.spec.blocks(), str(r.spec.num_warps)]
        for x in res:
            if x.error:
                cells += ["**error**", x.error.replace("|", "/")]
            else:
                cells += [str(x.regs), f"**{x.spill_stores}+{x.spill_loads}**" if x.spills else "0"]
        blocks, frac = res[0].occupancy()
        cells += [str(res[0].smem), f"{blocks}, {frac:.0%}", str(r.count)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[Row], archs: Sequence[int] = ARCHS) -> str:
    """Per kernel: the most registers and spill bytes over its specialisations."""
    return _per_kernel(specs(rows), archs)


def _per_kernel(spec_list, archs):
    by = collections.defaultdict(list)
    for s in spec_list:
        by[s.name].append(s)
    head = ["kernel", "specialisations"] + [f"max regs {sm(a)}" for a in archs] + [f"max spills {sm(a)} (B)" for a in archs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(by):
        res = {a: [compile_spec(s, a) for s in by[name]] for a in archs}
        cells = [f"`{name}`", str(len(by[name]))]
        cells += [str(max(x.regs for x in res[a])) for a in archs]
        cells += [str(max(x.spills for x in res[a])) for a in archs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the grid


@dataclasses.dataclass
class GridEntry:
    """A distinct specialisation of the grid: the first launch that made it, where (shape),
    and how many of the grid's shapes launch it."""

    spec: Spec
    launch: Launch
    shapes: int


def collect_grid(shapes: Sequence[Shape] = None) -> List[GridEntry]:
    """Every distinct specialisation the grid's meta-steps launch, in first-seen order."""
    entries: Dict[Spec, GridEntry] = {}
    for shape in grid_shapes() if shapes is None else shapes:
        seen = set()
        for launch in launches(shape):
            spec = specialise(launch)
            if spec in seen:
                continue
            seen.add(spec)
            if spec in entries:
                entries[spec].shapes += 1
            else:
                entries[spec] = GridEntry(spec, launch, 1)
    return list(entries.values())


def grid_numbers(entries: Sequence[GridEntry], archs: Sequence[int] = ARCHS) -> dict:
    """Specialisations, those that spill or fail (any target), the most registers per target."""
    res = [(e, a, compile_spec(e.spec, a)) for e in entries for a in archs]
    return dict(specs=len(entries), spilling=len({id(e) for e, _, x in res if x.spills}),
                errors=len({id(e) for e, _, x in res if x.error}),
                max_regs={a: max((x.regs for e, b, x in res if b == a), default=0) for a in archs})


def grid_markdown(entries: Sequence[GridEntry], archs: Sequence[int] = ARCHS) -> str:
    """One row per distinct specialisation, with one shape that launches it."""
    archs = list(archs)
    head = ["kernel", "dtype", "blocks", "warps"]
    for a in archs:
        head += [f"regs {sm(a)}", f"spills {sm(a)} (B)"]
    head += ["smem (B)", "grid shapes", "e.g. at", "first tensor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in sorted(entries, key=lambda e: (e.spec.name, e.launch.dtype, e.spec.blocks(), e.spec.num_warps)):
        res = [compile_spec(e.spec, a) for a in archs]
        cells = [f"`{e.spec.name}`", e.launch.dtype, e.spec.blocks(), str(e.spec.num_warps)]
        for x in res:
            cells += ["**error**", x.error.replace("|", "/")] if x.error else [
                str(x.regs), f"**{x.spill_stores}+{x.spill_loads}**" if x.spills else "0"]
        cells += [str(res[0].smem), str(e.shapes), e.launch.config, _shape(e.launch)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_report(entries: Sequence[GridEntry], archs: Sequence[int] = ARCHS, shapes: int = None) -> str:
    n = grid_numbers(entries, archs)
    shapes = len(grid_shapes()) if shapes is None else shapes
    regs = ", ".join(f"{n['max_regs'][a]} on {sm(a)}" for a in archs)
    head = (f"## The grid\n\n{shapes} meta-step shapes: OmniglotConv and MiniImagenetConv at T in "
            f"{{{', '.join(map(str, GRID_T))}}}, (way, shot) in {{{', '.join(f'{w}x{s}' for w, s in GRID_SUPPORT)}}} "
            f"({min(w * s for w, s in GRID_SUPPORT)} to {max(w * s for w, s in GRID_SUPPORT)} support examples), "
            f"{{{', '.join(map(str, GRID_CHANNELS))}}} channels, fp32 and fp64. "
            f"**{n['specs']} distinct specialisations; {n['spilling']} spill, {n['errors']} fail to compile; "
            f"most registers: {regs}.** `grid shapes` counts the shapes that launch a specialisation; "
            f"`e.g. at` names one.\n")
    return "\n".join([head, "### Per kernel\n", _per_kernel([e.spec for e in entries], archs), "",
                      "### Per specialisation\n", grid_markdown(entries, archs), ""])


def report(configs=tuple(CONFIGS), dtypes=tuple(DTYPES), archs=ARCHS, rows=None, grid=None) -> str:
    """The markdown report: a header, the per-kernel summary and the per-launch table at the
    paper's shapes; with ``grid`` (:func:`collect_grid`'s entries) the grid's sections after."""
    rows = collect(configs, dtypes) if rows is None else rows
    prefetch(list(dict.fromkeys(specs(rows) + [e.spec for e in grid or ()])), archs)
    n = len(specs(rows))
    title = "the paper's shapes and a grid beyond" if grid is not None else "the paper's shapes"
    head = (f"# Triton kernels compiled for the GPU at {title}\n\n"
            f"{machine_header()} (compiled only: no GPU needed) | "
            f"targets {', '.join(sm(a) for a in archs)}\n\n"
            f"`python -m bench compile{' --grid' if grid is not None else ''}`: at the paper's shapes {n} distinct "
            f"specialisations, from one meta-step of each of "
            f"{', '.join(configs)} ({', '.join(dtypes)}) recorded without a GPU (2 inner steps, the query "
            f"linearisation, 2 CG iterations: `launches` counts them). Registers and spills (stores+loads, "
            f"bytes) are `ptxas -v`'s (the wheel's); smem is Triton's dynamic shared memory plus ptxas' static; "
            f"occupancy is estimated per SM against the H100's limits (65,536 registers, 2,048 threads, "
            f"228 KB shared memory, 32 blocks; {H100_SMS} SMs).\n")
    parts = [head, "## Per kernel\n", summary(rows, archs), "", "## Per launch\n", markdown(rows, archs), ""]
    if grid is not None:
        parts.append(grid_report(grid, archs, len(grid_shapes(tuple(dtypes)))))
    return "\n".join(parts)


def _res(spec, archs):
    out = {}
    for a in archs:
        x = compile_spec(spec, a)
        out[str(a)] = dict(dataclasses.asdict(x), spills=x.spills, occupancy=x.occupancy()[1])
    return out


def results(configs=tuple(CONFIGS), dtypes=tuple(DTYPES), archs=ARCHS, grid=False) -> dict:
    """Everything as plain data: ``{"rows": [...], "markdown": report}``, a row per launch
    shape at the paper's shapes with its specialisation's resources per target; with ``grid``
    also ``"grid": {"shapes": n, "specs": [...]}``, one entry per distinct specialisation."""
    rows = collect(configs, dtypes)
    entries = collect_grid(grid_shapes(tuple(dtypes))) if grid else None
    prefetch(list(dict.fromkeys(specs(rows) + [e.spec for e in entries or ()])), archs)
    index = {s: i for i, s in enumerate(specs(rows))}
    out = [dict(kernel=r.spec.name, dtype=r.launch.dtype, config=r.launch.config, shape=_shape(r.launch),
                grid=list(r.launch.grid), programs=r.programs, count=r.count, warps=r.spec.num_warps,
                blocks=r.spec.blocks(), constexprs={n: v for n, v in r.spec.constexprs_named()},
                spec=index[r.spec], res=_res(r.spec, archs)) for r in rows]
    data = {"rows": out, "markdown": report(configs, dtypes, archs, rows, entries)}
    if grid:
        data["grid"] = {"shapes": len(grid_shapes(tuple(dtypes))), "specs": [
            dict(kernel=e.spec.name, dtype=e.launch.dtype, config=e.launch.config, shape=_shape(e.launch),
                 warps=e.spec.num_warps, blocks=e.spec.blocks(), shapes=e.shapes, res=_res(e.spec, archs))
            for e in entries]}
    return data
