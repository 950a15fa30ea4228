"""`nsa bench`: NSA against dense attention (torch SDPA, FlashAttention-2 and cuDNN backends) and
fla-core's ``parallel_nsa``, all in one process on one card."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from nsa.bench.prefill import HEAD_DIMS, HEADS, SEQ_LENS


def _parse_head_dims(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        try:
            dk, _, dv = item.partition("/")
            pairs.append((int(dk), int(dv or dk)))
        except ValueError:
            raise click.BadParameter(f"expected DK/DV pairs like 128/128,192/128, got {item!r}",
                                     param_hint="--head-dims") from None
    return pairs


def _parse_heads(text: str) -> tuple[int, int]:
    """``HQ/HK`` query and key/value heads, ``HQ`` a multiple of ``HK``."""
    try:
        num_heads, num_kv_heads = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected HQ/HK (query/key-value heads) like 64/4, got {text!r}",
                                 param_hint="--heads") from None
    if num_kv_heads < 1 or num_heads < num_kv_heads or num_heads % num_kv_heads:
        raise click.BadParameter(f"HQ must be a positive multiple of HK, got {num_heads}/{num_kv_heads}",
                                 param_hint="--heads")
    return num_heads, num_kv_heads


def _parse_ints(text: str, hint: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=hint) from None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _repeat_summary(records: list[dict]):
    """A rich table: per shape and implementation, the median and range of each ratio to the
    baselines over the rounds of ``--repeats`` (each ratio taken within one round)."""
    import statistics

    from rich.table import Table

    ratios = ("fwd_x_cudnn", "bwd_x_cudnn", "fwd_x_flash2")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if not r["impl"].startswith("sdpa-"):
            groups.setdefault((r["seq_len"], r["head_dim"], r["v_head_dim"], r["impl"]), []).append(r)
    table = Table(title="Ratios over the rounds: median (min-max)")
    for col in ("impl", "T", "Dk/Dv", "rounds", *(name.replace("_", " ") for name in ratios)):
        table.add_column(col)
    for (seq_len, dk, dv, impl), rows in groups.items():
        cells = []
        for name in ratios:
            values = [r[name] for r in rows if r[name] is not None]
            cells.append(f"{_fmt(statistics.median(values))} ({_fmt(min(values))}-{_fmt(max(values))})"
                         if values else "-")
        table.add_row(impl, str(seq_len), f"{dk}/{dv}", str(len(rows)), *cells)
    return table


def _write_rows(rows: list[dict], out_dir: Path, kind: str) -> Path:
    """Bench rows as one Parquet table per run, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_id = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir / "bench" / f"run={run_id}"
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{kind}.parquet"
    table = pa.Table.from_pylist(rows)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


@click.group("bench", invoke_without_command=True)
@click.option("--seq-lens", default=",".join(map(str, SEQ_LENS)), show_default=True,
              help="Comma-separated sequence lengths.")
@click.option("--head-dims", default=",".join(f"{a}/{b}" for a, b in HEAD_DIMS), show_default=True,
              help="Comma-separated DK/DV pairs.")
@click.option("--heads", default="/".join(map(str, HEADS)), show_default=True,
              help="HQ/HK: query and key/value heads (issue 3's layout by default; 16/4 has 4 query heads "
                   "per key/value head).")
@click.option("--peer/--no-peer", default=True, show_default=True, help="Also time fla-core's parallel_nsa.")
@click.option("--breakdown/--no-breakdown", default=True, show_default=True, help="Per-branch kernel times.")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Time each shape's baselines and NSA this many times in turn (ratios within each round; "
                   "a summary gives their median and range).")
@click.option("--out", "out_dir", default="reports", show_default=True, type=click.Path(file_okay=False),
              help="Where the result table goes (reports/bench/run=<id>/prefill.parquet).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows as JSON to this file.")
@click.pass_context
def bench(ctx: click.Context, seq_lens: str, head_dims: str, heads: str, peer: bool, breakdown: bool,
          repeats: int, out_dir: str, json_out: str | None) -> None:
    """Prefill benchmark (default): forward, backward, forward+backward, peak memory and ratios."""
    if ctx.invoked_subcommand is not None:
        return
    import torch
    from rich.console import Console
    from rich.table import Table

    from nsa.bench import prefill

    lengths = _parse_ints(seq_lens, "--seq-lens")
    dims = _parse_head_dims(head_dims)
    num_heads, num_kv_heads = _parse_heads(heads)
    if not torch.cuda.is_available():
        raise click.ClickException("nsa bench needs a CUDA device (none is visible to torch)")
    # Logs (CI, remote runs) get a wide table instead of one squeezed to 80 columns.
    console = Console() if Console().is_terminal else Console(width=220)
    card = torch.cuda.get_device_name()
    rows = []
    for dk, dv in dims:
        for n in lengths:
            layout = {"num_heads": num_heads, "num_kv_heads": num_kv_heads}
            for repeat in range(repeats):
                console.print(f"[dim]T={n} Dk={dk} Dv={dv} (round {repeat + 1} of {repeats}) ...[/dim]")
                group = prefill.dense_rows(n, dk, dv, **layout) + [prefill.nsa_row(n, dk, dv, **layout)]
                if peer:
                    group.append(prefill.fla_row(n, dk, dv, **layout))
                if breakdown and repeat == 0:
                    group += prefill.nsa_branch_rows(n, dk, dv, **layout)
                for row in group:
                    row.repeat = repeat
                torch.cuda.empty_cache()
                rows += group
    table = Table(title=f"NSA prefill, B=1 HQ={num_heads} HK={num_kv_heads} bf16, paper blocks, {card}")
    for col in ("impl", "T", "Dk/Dv", "fwd ms", "bwd ms", "f+b ms", "peak GiB",
                "fwd x cudnn", "bwd x cudnn", "fwd x fa2", "x fla f/b", "TFLOP/s f/b", "note"):
        table.add_column(col)
    records = []
    for r in rows:
        base = {b.impl: b for b in rows if b.seq_len == r.seq_len and b.head_dim == r.head_dim
                and b.v_head_dim == r.v_head_dim and b.repeat == r.repeat}
        cudnn, fa2, fla = base.get("sdpa-cudnn"), base.get("sdpa-flash2"), base.get("fla-parallel_nsa")
        ratios = {
            "fwd_x_cudnn": cudnn and prefill.ratio(cudnn, r, "fwd_ms"),
            "bwd_x_cudnn": cudnn and prefill.ratio(cudnn, r, "bwd_ms"),
            "fwd_x_flash2": fa2 and prefill.ratio(fa2, r, "fwd_ms"),
            "fwd_x_fla": fla and prefill.ratio(fla, r, "fwd_ms"),
            "bwd_x_fla": fla and prefill.ratio(fla, r, "bwd_ms"),
        }
        records.append({**r.as_dict(), **ratios, "device": card, "torch": torch.__version__})
        impl = r.impl if repeats == 1 else f"{r.impl} (round {r.repeat + 1})"
        table.add_row(impl, str(r.seq_len), f"{r.head_dim}/{r.v_head_dim}", _fmt(r.fwd_ms), _fmt(r.bwd_ms),
                      _fmt(r.fwdbwd_ms), _fmt(r.peak_mem_gib), _fmt(ratios["fwd_x_cudnn"]),
                      _fmt(ratios["bwd_x_cudnn"]), _fmt(ratios["fwd_x_flash2"]),
                      f"{_fmt(ratios['fwd_x_fla'])}/{_fmt(ratios['bwd_x_fla'])}",
                      f"{_fmt(r.fwd_tflops)}/{_fmt(r.bwd_tflops)}", r.note[:40])
    path = _write_rows(records, Path(out_dir), "prefill")
    if json_out:
        Path(json_out).write_text(json.dumps(records, indent=1))
    console.print(table)
    if repeats > 1:
        console.print(_repeat_summary(records))
    console.print(f"rows written to {path}")
    click.echo(json.dumps({"rows": len(records), "path": str(path)}))


@bench.command("decode")
@click.option("--contexts", default="8192,16384,32768,65536,131072", show_default=True,
              help="Comma-separated context lengths S (tokens in the cache, the new one included).")
@click.option("--batches", default="1,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--head-dims", default="128/128,192/128", show_default=True, help="Comma-separated DK/DV pairs.")
@click.option("--budget-s", default=None, type=float,
              help="Start no new shape after this many seconds (rows past it say 'skipped').")
@click.option("--out", "out_dir", default="reports", show_default=True, type=click.Path(file_okay=False),
              help="Where the result table goes (reports/bench/run=<id>/decode.parquet).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows as JSON to this file.")
def bench_decode(contexts: str, batches: str, head_dims: str, budget_s: float | None, out_dir: str,
                 json_out: str | None) -> None:
    """Decode benchmark: one NSA decode step (Triton, CUDA graph) beside torch SDPA over a dense
    cache (every backend that runs), bytes the step must read (spec formula) and bandwidth achieved."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from nsa.bench import decode

    if not torch.cuda.is_available():
        raise click.ClickException("nsa bench decode needs a CUDA device (none is visible to torch)")
    # Logs (CI, remote runs) get a wide table instead of one squeezed to 80 columns.
    console = Console() if Console().is_terminal else Console(width=220)
    card = torch.cuda.get_device_name()
    deadline = None if budget_s is None else time.time() + budget_s
    rows, copy = decode.measure(_parse_ints(contexts, "--contexts"), _parse_ints(batches, "--batches"),
                                _parse_head_dims(head_dims), deadline=deadline,
                                log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    records = [{**r.as_dict(), "copy_gbps": copy, "device": card, "torch": torch.__version__} for r in rows]
    path = _write_rows(records, Path(out_dir), "decode")
    table = Table(title=f"NSA decode step, HQ=64 HK=4 bf16, paper blocks, {card} (copy {copy:.0f} GB/s)")
    for col in ("impl", "S", "B", "Dk/Dv", "us/step", "MB read", "GB/s", "% copy", "x best dense", "graph", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.impl, str(r.context), str(r.batch), f"{r.head_dim}/{r.v_head_dim}", _fmt(r.us),
                      f"{r.bytes_read / 1e6:.1f}", _fmt(r.gbps),
                      _fmt(None if r.copy_fraction is None else 100 * r.copy_fraction), _fmt(r.speedup_vs_dense),
                      "yes" if r.cuda_graph else "no", r.note[:40])
    if json_out:
        Path(json_out).write_text(json.dumps(records, indent=1))
    console.print(table)
    # Where an NSA step's time goes: device time per kernel (eager, torch.profiler).
    for r in rows:
        if r.impl == "nsa-triton" and r.kernels_us:
            launches = "programmatic launches" if r.programmatic_launch else "ordinary launches"
            console.print(f"NSA kernels, S={r.context} B={r.batch} {r.head_dim}/{r.v_head_dim} "
                          f"({launches}; us): {r.kernels_us}", highlight=False)
    console.print(f"rows written to {path}")
    click.echo(json.dumps({"rows": len(records), "path": str(path)}))
