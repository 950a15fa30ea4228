"""PNG heatmaps of a case's compression-branch probabilities and block selection (queries x blocks).

`nsa report plot RUN CASE` regenerates the pictures from the case's stored params rather than
storing tensors: the config (``num_heads``/``heads``, ``num_kv_heads``/``kv_heads``, ``head_dim``/``dk``,
``compress_block``/``l``, ``compress_stride``/``d``, ``select_block``/``lp``, ``select_count``/``n``;
parity's ``group``), ``seq_len`` and ``seed`` (default: a hash of the params, as the suites do) give
seeded random ``q`` and ``k`` for one key/value head; ``k_cmp`` is their mean-pooled compression
(``compress_mean``). A suite whose inputs are not plain random (e.g. a planted needle) can supply
them through ``Suite.plot_inputs``. At most :data:`MAX_QUERIES` queries are drawn (the last ones,
where the most blocks are visible) so a 128k case still plots in seconds on a CPU.

Three figures: ``p_cmp`` (query head 0's softmax over the visible compressed tokens, Eq. 8), the
selection block scores of the key/value head (Eq. 9-10, summed over its query heads) and the
selected blocks (top-n with the forced ones). Matplotlib runs headless (Agg canvas, no pyplot).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

MAX_QUERIES = 2048
DEFAULT_SEQ_LEN = 1024
# NSAConfig field <- names the suites use for it in case params.
PARAM_ALIASES = {
    "num_heads": ("num_heads", "heads"), "num_kv_heads": ("num_kv_heads", "kv_heads"),
    "head_dim": ("head_dim", "dk"), "compress_block": ("compress_block", "l"),
    "compress_stride": ("compress_stride", "d"), "select_block": ("select_block", "lp"),
    "select_count": ("select_count", "n"),
}
# Small, valid defaults for whatever a case does not say (a config must hold l <= l', d | l, ...).
DEFAULTS = {"num_heads": 4, "num_kv_heads": 1, "head_dim": 32, "compress_block": 32, "compress_stride": 16,
            "select_block": 64, "select_count": 16}


def config_from_params(params: dict[str, Any]):
    """The :class:`NSAConfig` a case's params describe, defaults filling the gaps."""
    from nsa import NSAConfig

    values = dict(DEFAULTS)
    for field_name, aliases in PARAM_ALIASES.items():
        for alias in aliases:
            if isinstance(params.get(alias), int) and not isinstance(params.get(alias), bool):
                values[field_name] = params[alias]
                break
    if "group" in params and not any(a in params for a in PARAM_ALIASES["num_heads"]):
        values["num_heads"] = int(params["group"]) * values["num_kv_heads"]
    return NSAConfig(**values)


def seed_from_params(params: dict[str, Any]) -> int:
    if isinstance(params.get("seed"), int):
        return int(params["seed"])
    stable = {k: v for k, v in params.items() if k != "backend"}
    return zlib.crc32(json.dumps(stable, sort_keys=True, default=str).encode()) & 0x7FFFFFFF


def seq_len_from_params(params: dict[str, Any]) -> int:
    for key in ("seq_len", "T", "context"):
        if isinstance(params.get(key), int) and params[key] > 0:
            return int(params[key])
    return DEFAULT_SEQ_LEN


def random_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """Seeded ``q [1, Tq, G, Dk]`` (the last ``Tq <= MAX_QUERIES`` positions) and ``k [1, T, 1, Dk]``,
    float32, for key/value head 0 of the case's config."""
    import torch

    config = config_from_params(params)
    seq_len = seq_len_from_params(params)
    q_len = min(seq_len, MAX_QUERIES)
    gen = torch.Generator().manual_seed(seed_from_params(params))
    k = torch.randn(1, seq_len, 1, config.head_dim, generator=gen)
    q = torch.randn(1, q_len, config.group_size, config.head_dim, generator=gen)
    return {"q": q, "k": k, "config": config, "q_offset": seq_len - q_len}


def heatmap_data(inputs: dict[str, Any]) -> dict[str, Any]:
    """``p_cmp [Tq, N]``, ``block_scores [Tq, NB]`` and ``selected [Tq, NB]`` (0/1) as numpy arrays."""
    import torch

    from nsa.ops import compress_mean, select_blocks, selection_block_scores, visible_compressed
    from nsa.ops.attention_core import masked_softmax

    q, k, config = inputs["q"], inputs["k"], inputs["config"]
    q_offset = int(inputs.get("q_offset", k.shape[1] - q.shape[1]))
    k_cmp = compress_mean(k, config.compress_block, config.compress_stride)
    positions = torch.arange(q_offset, q_offset + q.shape[1])
    allowed = torch.arange(k_cmp.shape[1])[None, :] < visible_compressed(positions, config.compress_block,
                                                                         config.compress_stride)[:, None]
    scores = (q[0, :, 0].double() @ k_cmp[0, :, 0].double().T) * q.shape[-1] ** -0.5
    p_cmp, _ = masked_softmax(scores, allowed)
    block_scores = selection_block_scores(q, k_cmp, block=config.compress_block, stride=config.compress_stride,
                                          select_block=config.select_block, q_offset=q_offset)
    chosen = select_blocks(block_scores, select_block=config.select_block, select_count=config.select_count,
                           q_offset=q_offset)[0, :, 0]
    selected = torch.zeros(block_scores.shape[1], block_scores.shape[-1] + 1)
    selected.scatter_(1, torch.where(chosen >= 0, chosen, block_scores.shape[-1]), 1.0)  # -1 pads -> spare column
    return {"p_cmp": p_cmp.float().numpy(), "block_scores": block_scores[0, :, 0].float().numpy(),
            "selected": selected[:, :-1].numpy(), "q_offset": q_offset, "config": config}


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "case"


def plot_case(suite: str, case_id: str, params: dict[str, Any], output_dir: Path | str,
              inputs: dict[str, Any] | None = None) -> list[Path]:
    """Write ``<suite>__<case>__{p_cmp,selection_scores,selected_blocks}.png`` into ``output_dir``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = heatmap_data(inputs or random_inputs(params))
    config, q_offset = data["config"], data["q_offset"]
    q_len = data["p_cmp"].shape[0]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{safe_name(suite)}__{safe_name(case_id)}"
    subtitle = (f"{suite}::{case_id}  kv head 0, G={config.group_size}, l={config.compress_block}, "
                f"d={config.compress_stride}, l'={config.select_block}, n={config.select_count}")
    figures = (
        ("p_cmp", data["p_cmp"], "compressed token", "p_cmp (query head 0, Eq. 8)", "viridis"),
        ("selection_scores", data["block_scores"], "selection block", "selection block scores (Eq. 9-10)",
         "magma"),
        ("selected_blocks", data["selected"], "selection block", "selected blocks (top-n, forced included)",
         "Greys"),
    )
    paths = []
    for name, values, xlabel, title, cmap in figures:
        figure = Figure(figsize=(8, 6), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap,
                            extent=(0, max(values.shape[1], 1), q_offset + q_len, q_offset))
        axes.set_xlabel(xlabel)
        axes.set_ylabel("query position")
        axes.set_title(f"{title}\n{subtitle}", fontsize=9)
        figure.colorbar(image, ax=axes)
        path = out / f"{stem}__{name}.png"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        figure.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
        paths.append(path)
    return paths
