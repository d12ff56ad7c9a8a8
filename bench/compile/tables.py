"""The tables of ``bench compile``: one row per distinct launch shape and specialisation
(:func:`collect`), per-launch and per-kernel markdown, the report and the plain-data
:func:`results`."""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Sequence

import torch

from ..common import machine_header
from .compiling import ARCHS, H100_SMS, compile_spec, prefetch
from .recording import CONFIGS, DTYPES, Launch, meta_step_launches
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
        head += [f"regs sm_{a}", f"spills sm_{a} (B)"]
    head += ["smem (B)", f"occupancy sm_{archs[0]} (blocks/SM, warps)", "launches"]
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
    by = collections.defaultdict(list)
    for s in specs(rows):
        by[s.name].append(s)
    head = ["kernel", "specialisations"] + [f"max regs sm_{a}" for a in archs] + [f"max spills sm_{a} (B)" for a in archs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(by):
        res = {a: [compile_spec(s, a) for s in by[name]] for a in archs}
        cells = [f"`{name}`", str(len(by[name]))]
        cells += [str(max(x.regs for x in res[a])) for a in archs]
        cells += [str(max(x.spills for x in res[a])) for a in archs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(configs=tuple(CONFIGS), dtypes=tuple(DTYPES), archs=ARCHS, rows=None) -> str:
    """The markdown report: a header, the per-kernel summary and the per-launch table."""
    rows = collect(configs, dtypes) if rows is None else rows
    prefetch(specs(rows), archs)
    n = len(specs(rows))
    head = (f"# Triton kernels compiled for the GPU at the paper's shapes\n\n"
            f"{machine_header()} (compiled only: no GPU needed) | "
            f"targets {', '.join(f'sm_{a}' for a in archs)}\n\n"
            f"`python -m bench compile`: {n} distinct specialisations, from one meta-step of each of "
            f"{', '.join(configs)} ({', '.join(dtypes)}) recorded without a GPU (2 inner steps, the query "
            f"linearisation, 2 CG iterations: `launches` counts them). Registers and spills (stores+loads, "
            f"bytes) are `ptxas -v`'s (the wheel's); smem is Triton's dynamic shared memory plus ptxas' static; "
            f"occupancy is estimated per SM against the H100's limits (65,536 registers, 2,048 threads, "
            f"228 KB shared memory, 32 blocks; {H100_SMS} SMs).\n")
    return "\n".join([head, "## Per kernel\n", summary(rows, archs), "", "## Per launch\n", markdown(rows, archs), ""])


def results(configs=tuple(CONFIGS), dtypes=tuple(DTYPES), archs=ARCHS) -> dict:
    """Everything as plain data: ``{"rows": [...], "markdown": report}``; a row per launch
    shape with its specialisation's resources per target."""
    rows = collect(configs, dtypes)
    prefetch(specs(rows), archs)
    out = []
    for r in rows:
        res = {}
        for a in archs:
            x = compile_spec(r.spec, a)
            res[str(a)] = dict(dataclasses.asdict(x), spills=x.spills, occupancy=x.occupancy()[1])
        out.append(dict(kernel=r.spec.name, dtype=r.launch.dtype, config=r.launch.config, shape=_shape(r.launch),
                        grid=list(r.launch.grid), programs=r.programs, count=r.count, warps=r.spec.num_warps,
                        blocks=r.spec.blocks(), constexprs={n: v for n, v in r.spec.constexprs_named()},
                        spec=specs(rows).index(r.spec), res=res))
    return {"rows": out, "markdown": report(configs, dtypes, archs, rows)}
