"""nsa.models: retrieval task generator, the LM and its dense twin, training pieces, `nsa train`."""

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.train_cmd import train as train_command
from nsa import NSAConfig
from nsa.models import (
    LMConfig,
    RetrievalLM,
    RetrievalTask,
    make_batch,
    nsa_only_parameters,
    parameter_group,
    retrieval_accuracy,
)
from nsa.models.lm import DenseAttention, copy_twin_init, init_phi_as_mean
from nsa.models.tasks import (
    BOS,
    IGNORE,
    KEY,
    NEEDLE_LEN,
    QUERY,
    QUERY_LEN,
    BatchStream,
    RetrievalCount,
    needle_block_selected,
)
from nsa.models.train import (
    LOG_BASE_COLUMNS,
    TrainConfig,
    context_at,
    fit_schedule,
    gpu_config,
    group_grad_norms,
    learning_rate,
    load_model_run,
    make_optimizer,
    nsa_pattern_at,
    read_table,
    resume_config,
    run_training,
    set_learning_rate,
    set_nsa_pattern,
    step_milliseconds,
    tiny_config,
    train_model,
    write_table,
)
from nsa.phi import BlockCompressor

SMALL_NSA = NSAConfig(num_heads=4, num_kv_heads=2, head_dim=8, compress_block=4, compress_stride=2,
                      select_block=8, select_count=4, window=8)


def _model(attention: str, task: RetrievalTask, layers: int = 2, **changes) -> RetrievalLM:
    torch.manual_seed(0)
    return RetrievalLM(LMConfig(vocab_size=task.vocab_size, d_model=32, num_layers=layers, nsa=SMALL_NSA,
                                attention=attention, **changes))


# ----- tasks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("needles,queries,context", [(1, 1, 40), (4, 4, 96), (6, 2, 200), (3, 1, 25)])
def test_batch_answer_is_retrievable_from_the_haystack(needles, queries, context):
    task = RetrievalTask(num_keys=12, num_values=10, num_filler=20, num_needles=needles, num_queries=queries)
    batch = make_batch(task, 5, context, seed=needles * 100 + context)
    tokens, targets = batch.tokens, batch.targets
    assert tokens.shape == targets.shape == (5, context) and tokens.dtype == torch.int64
    assert (tokens[:, 0] == BOS).all()
    haystack_end = context - QUERY_LEN * queries
    for row in range(5):
        hay = tokens[row, :haystack_end]
        assert int((hay == KEY).sum()) == needles  # needles do not overlap or clip
        supervised = (targets[row] != IGNORE).nonzero().flatten()
        assert supervised.tolist() == sorted(batch.answer_positions[row].tolist())
        for q in range(queries):
            pos = int(batch.answer_positions[row, q])
            key, answer = int(tokens[row, pos]), int(batch.answers[row, q])
            assert int(tokens[row, pos - 1]) == QUERY
            assert int(targets[row, pos]) == answer
            assert task.value_start <= answer < task.filler_start
            # The key occurs exactly once in the haystack, right after KEY, followed by the answer.
            where = (hay == key).nonzero().flatten().tolist()
            start = int(batch.needle_starts[row, q])
            assert where == [start + 1]
            assert int(tokens[row, start]) == KEY and int(tokens[row, start + 2]) == answer
        # Every filler token is in the filler range; nothing else leaks into the haystack.
        marked = torch.zeros(haystack_end, dtype=torch.bool)
        marked[0] = True
        for start in (hay == KEY).nonzero().flatten().tolist():
            marked[start:start + NEEDLE_LEN] = True
        assert (hay[~marked] >= task.filler_start).all()


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("needles", [1, 5])
def test_depth_is_honoured(depth, needles):
    task = RetrievalTask(num_keys=16, num_values=8, num_filler=8, num_needles=needles, num_queries=1)
    context = 300
    batch = make_batch(task, 4, context, seed=7, depth=depth)
    haystack = context - QUERY_LEN - 1
    expected = 1 + round(depth * (haystack - NEEDLE_LEN))
    assert (batch.needle_starts[:, 0] == expected).all()
    assert torch.allclose(batch.depths[:, 0], torch.full((4,), depth, dtype=torch.float64), atol=1 / haystack)
    if depth == 1.0:  # the needle ends right before the first query
        assert expected + NEEDLE_LEN == context - QUERY_LEN
    assert (batch.tokens[:, expected] == KEY).all()


@pytest.mark.parametrize("needles", [1, 4])
def test_adjacent_rate_places_the_asked_needle_right_before_the_queries(needles):
    context, rows = 200, 400
    plain = RetrievalTask(num_keys=16, num_values=8, num_filler=8, num_needles=needles, num_queries=1)
    adjacent_start = context - QUERY_LEN - NEEDLE_LEN  # the needle ends where the first query starts
    # Rate 0 draws nothing extra: the same batches as a task without the option.
    assert torch.equal(make_batch(plain.replace(adjacent_rate=0.0), 8, context, seed=5).tokens,
                       make_batch(plain, 8, context, seed=5).tokens)
    always = make_batch(plain.replace(adjacent_rate=1.0), rows, context, seed=5)
    assert (always.needle_starts[:, 0] == adjacent_start).all() and (always.depths[:, 0] == 1.0).all()
    assert (always.tokens[:, adjacent_start] == KEY).all()
    assert (always.tokens[:, adjacent_start + 1] == always.tokens[:, context - QUERY_LEN + 1]).all()
    half = make_batch(plain.replace(adjacent_rate=0.5), rows, context, seed=5)
    at_end = (half.needle_starts[:, 0] == adjacent_start).float().mean().item()
    assert 0.4 < at_end < 0.6  # uniform placement alone ends there in ~1 of 190 sequences
    for batch in (always, half):  # the other needles still fit around it: exactly one KEY each
        assert ((batch.tokens == KEY).sum(1) == needles).all()
    # Fixed-depth batches (evaluation) ignore the rate.
    fixed = make_batch(plain.replace(adjacent_rate=1.0), 8, context, seed=5, depth=0.5)
    assert (fixed.depths[:, 0] - 0.5).abs().max() < 0.01


def test_batches_are_deterministic_and_seed_dependent():
    task = RetrievalTask(num_needles=3, num_queries=2)
    a, b = make_batch(task, 3, 128, seed=11), make_batch(task, 3, 128, seed=11)
    c = make_batch(task, 3, 128, seed=12)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answers, b.answers)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("contexts", [(64, 64, 64), (64, 128, 128, 64, 96), (128,)])
def test_batch_stream_draws_the_batches_of_make_batch_in_order(contexts):
    """The prefetching stream hands out exactly make_batch's batches for each step's context,
    whether or not the next context matches the guess, and its state continues the stream."""
    task = RetrievalTask(num_needles=3, num_queries=2, adjacent_rate=0.5)
    plain, streamed = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    stream = BatchStream(task, 3, streamed)
    try:
        for step, context in enumerate(contexts):
            expected, got = make_batch(task, 3, context, plain), stream.next(context)
            assert torch.equal(expected.tokens, got.tokens), step
            assert torch.equal(expected.answers, got.answers), step
            assert torch.equal(stream.state(), plain.get_state()), step
    finally:
        stream.close()
    resumed = torch.Generator()
    resumed.set_state(stream.state())
    assert torch.equal(make_batch(task, 3, 64, resumed).tokens, make_batch(task, 3, 64, plain).tokens)


def test_task_and_batch_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_queries"):
        RetrievalTask(num_needles=2, num_queries=3)
    with pytest.raises(ValueError, match="num_keys"):
        RetrievalTask(num_keys=2, num_needles=3, num_queries=1)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="adjacent_rate"):
            RetrievalTask(adjacent_rate=bad)
    task = RetrievalTask(num_needles=2, num_queries=2)
    with pytest.raises(ValueError, match="context"):
        make_batch(task, 2, task.min_context() - 1, seed=0)
    with pytest.raises(ValueError, match="depth"):
        make_batch(task, 2, 64, seed=0, depth=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        make_batch(task, 0, 64, seed=0)


# ----- model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_model_shapes_and_logits_at(attention):
    task = RetrievalTask(num_keys=8, num_values=8, num_filler=8, num_needles=2, num_queries=2)
    model = _model(attention, task)
    batch = make_batch(task, 3, 50, seed=1)
    logits = model(batch.tokens)
    assert logits.shape == (3, 50, task.vocab_size) and logits.dtype == torch.float32
    picked = model(batch.tokens, logits_at=batch.answer_positions)
    assert picked.shape == (3, 2, task.vocab_size)
    expected = logits.gather(1, batch.answer_positions[..., None].expand(-1, -1, task.vocab_size))
    torch.testing.assert_close(picked, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        model(batch.tokens.float())


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_model_is_causal(attention):
    task = RetrievalTask(num_keys=8, num_values=8, num_filler=8)
    model = _model(attention, task).double()
    tokens = make_batch(task, 2, 48, seed=3).tokens
    base = model(tokens)
    changed = tokens.clone()
    changed[:, 30] = task.filler_start + (changed[:, 30] - task.filler_start + 1) % task.num_filler
    out = model(changed)
    assert torch.equal(out[:, :30], base[:, :30])
    assert (out[:, 30:] - base[:, 30:]).abs().max() > 0


def test_dense_attention_matches_explicit_causal_softmax():
    """The dense twin against a float64 softmax with an explicit causal mask (G = 2, RoPE'd q/k)."""
    from nsa.rope import apply_rope

    torch.manual_seed(0)
    config = NSAConfig(num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=8)
    layer = DenseAttention(16, config).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    out = layer(x)
    pos = torch.arange(23)
    q = apply_rope(layer.q_proj(x).view(2, 23, 4, 8), pos)
    k = apply_rope(layer.k_proj(x).view(2, 23, 2, 8), pos).repeat_interleave(2, dim=2)
    v = layer.v_proj(x).view(2, 23, 2, 8).repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(23, 23, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(2, 23, 32)
    torch.testing.assert_close(out, layer.o_proj(o), rtol=1e-10, atol=1e-10)


def test_twins_differ_only_by_nsa_parts():
    """Dense params = NSA params - (2 extra k/v projection pairs + phi_k/phi_v + gate MLP)."""
    task = RetrievalTask()
    for layers, tie in ((1, True), (3, False)):
        nsa, dense = _model("nsa", task, layers, tie_embeddings=tie), _model("dense", task, layers,
                                                                             tie_embeddings=tie)
        count = lambda m: sum(p.numel() for p in m.parameters())
        extra = nsa_only_parameters(nsa)
        assert count(dense) == count(nsa) - sum(extra.values())
        c, d = SMALL_NSA, 32
        assert extra["kv_extra"] == layers * 2 * d * c.num_kv_heads * (c.head_dim + c.v_head_dim)
        assert extra["gate"] == layers * (d * c.num_heads * 3 + c.num_heads * 3)
        assert nsa_only_parameters(dense) == {"kv_extra": 0, "phi": 0, "gate": 0}


def test_phi_starts_as_mean_pooling():
    torch.manual_seed(1)
    phi = BlockCompressor("mlp", 8, 4, 6)
    init_phi_as_mean(phi)
    blocks = torch.randn(2, 3, 8, 2, 6)
    expected = (blocks + phi.position[None, None, :, None, :]).mean(dim=2)
    torch.testing.assert_close(phi.compress_blocks(blocks), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hidden"):
        init_phi_as_mean(BlockCompressor("mlp", 8, 4, 6, hidden=8))


def test_nsa_branches_start_with_equal_key_value_projections():
    """The shared query must not start out matching three unrelated key projections (the
    "independent" draws made NSA learn retrieval far more slowly than its twin, docs/TRAINING.md)."""
    task = RetrievalTask()
    model = _model("nsa", task)
    for block in model.blocks:
        for proj in (block.attn.k_proj, block.attn.v_proj):
            assert torch.equal(proj["slc"].weight, proj["cmp"].weight)
            assert torch.equal(proj["win"].weight, proj["cmp"].weight)
            assert proj["slc"].weight is not proj["cmp"].weight  # still separate parameters
            assert proj["cmp"].weight.std() > 0.01
    # Separate parameters: an update to one branch leaves the others alone.
    with torch.no_grad():
        model.blocks[0].attn.k_proj["slc"].weight.add_(1.0)
    assert not torch.equal(model.blocks[0].attn.k_proj["slc"].weight, model.blocks[0].attn.k_proj["cmp"].weight)
    independent = _model("nsa", task, branch_init="independent")
    k = independent.blocks[0].attn.k_proj
    assert not torch.equal(k["slc"].weight, k["cmp"].weight)
    with pytest.raises(ValueError, match="branch_init"):
        LMConfig(vocab_size=task.vocab_size, branch_init="tied")
    assert LMConfig.from_dict(model.config.to_dict()) == model.config


def _optimizer_scales(config):
    """A model of ``config``, its optimizer, each parameter's ``lr_scale`` (by id) and the
    parameters by name; every parameter is in exactly one group."""
    model = RetrievalLM(config.model)
    optimizer = make_optimizer(model, config)
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(scale_of) == len(names)
    return model, optimizer, scale_of, names


def test_phi_trains_at_a_scaled_learning_rate():
    """phi starts as mean pooling with weights 1/l; at the full rate Adam scrambles it within tens
    of steps, so its parameters get ``phi_lr_scale`` times the step's learning rate."""
    config = tiny_config()
    assert config.phi_lr_scale == 0.1
    model, optimizer, scale_of, names = _optimizer_scales(config)
    for name, p in names.items():
        assert scale_of[id(p)] == (0.1 if ".phi_" in name else 1.0), name
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(names["blocks.0.attn.phi_k.mlp.0.weight"])] == config.weight_decay
    assert decay_of[id(names["blocks.0.attn.phi_k.mlp.0.bias"])] == 0.0
    set_learning_rate(optimizer, 2e-3)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(2e-3 * group["lr_scale"])
    # One step moves a phi weight by about lr * scale (Adam's first step is lr * sign(grad)).
    batch = make_batch(config.task, 4, 64, seed=3)
    before = names["blocks.0.attn.phi_k.mlp.0.weight"].detach().clone()
    q_before = names["blocks.0.attn.q_proj.weight"].detach().clone()
    logits = model(batch.tokens, logits_at=batch.answer_positions)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.answers.flatten()).backward()
    optimizer.step()
    phi_step = (names["blocks.0.attn.phi_k.mlp.0.weight"] - before).abs().max().item()
    q_step = (names["blocks.0.attn.q_proj.weight"] - q_before).abs().max().item()
    assert phi_step == pytest.approx(2e-4, rel=0.05) and q_step == pytest.approx(2e-3, rel=0.05)
    with pytest.raises(ValueError, match="phi_lr_scale"):
        config.replace(phi_lr_scale=-1.0)


def test_gate_trains_at_a_scaled_learning_rate():
    """The NSA gate MLP gets ``gate_lr_scale`` times the step's learning rate (its zero-initialised
    last layer otherwise swings every gate logit by about ``lr * ||x||_1`` per Adam step)."""
    config = tiny_config(gate_lr_scale=0.25)
    model, optimizer, scale_of, names = _optimizer_scales(config)
    for name, p in names.items():
        expected = 0.25 if ".gate_proj." in name else config.phi_lr_scale if ".phi_" in name else 1.0
        assert scale_of[id(p)] == expected, name
    set_learning_rate(optimizer, 2e-3)
    batch = make_batch(config.task, 4, 64, seed=3)
    gate = names["blocks.0.attn.gate_proj.weight"]
    logits = model(batch.tokens, logits_at=batch.answer_positions)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.answers.flatten()).backward()
    optimizer.step()
    # Adam's first step is lr * scale * sign(grad) (weight decay on a zero matrix adds nothing).
    assert gate.abs().max().item() == pytest.approx(5e-4, rel=0.05)
    assert gpu_config().gate_lr_scale == 1.0 and tiny_config().gate_lr_scale == 1.0  # opt-in only
    with pytest.raises(ValueError, match="gate_lr_scale"):
        config.replace(gate_lr_scale=-0.1)
    with pytest.raises(ValueError, match="gate_lr_scale"):
        config.replace(gate_lr_scale=True)


def test_gate_freeze_holds_the_gates_for_a_fraction_of_the_schedule(tmp_path):
    """``--gate-freeze 0.5``: the gates read exactly 0.5 (no update, no weight decay) through the
    first half of the schedule, then move."""
    result = CliRunner().invoke(train_command, [
        "--tiny", "--model", "nsa", "--steps", "80", "--gate-freeze", "0.5", "--eval-contexts", "64",
        "--eval-depths", "50", "--eval-samples", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["gate_freeze"] == 0.5
    # The gate MLP's last layer starts at zero, so every gate is exactly 0.5 (std 0 over tokens)
    # until its first update; a gate logged at step s (every 25th) is read before that step's
    # update, and steps 0..39 are frozen.
    stds = {r["step"]: [r[f"gate_std/{b}"] for b in ("cmp", "slc", "win")]
            for r in read_table(tmp_path / "train_log.parquet") if r["gate_std/cmp"] is not None}
    frozen = [s for s in stds if 0 < s <= 40]
    released = [s for s in stds if s > 41]
    assert frozen and released, sorted(stds)
    assert all(g == 0.0 for s in frozen for g in stds[s]), {s: stds[s] for s in frozen}
    assert all(min(stds[s]) > 1e-4 for s in released), {s: stds[s] for s in released}
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="gate_freeze"):
            tiny_config(gate_freeze=bad)
    bad = CliRunner().invoke(train_command, ["--tiny", "--gate-freeze", "2", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--gate-freeze" in bad.output


def test_dense_twin_starts_from_the_nsa_models_initial_weights(tmp_path):
    """Paired init: the twins differ only by NSA's own parts at step 0 (NSA's extra parameters
    come from the same random stream, so separately drawn twins differed in every later weight,
    and escaping the retrieval plateau depends strongly on the initial weights)."""
    config = tiny_config(models=("nsa", "dense"), steps=1, start_context=None)
    torch.manual_seed(config.seed)
    nsa_model = RetrievalLM(config.model)
    dense_model = RetrievalLM(config.model.replace(attention="dense"))
    copy_twin_init(nsa_model, dense_model)
    nsa_state = nsa_model.state_dict()
    for name, value in dense_model.state_dict().items():
        key = name.replace(".attn.k_proj.", ".attn.k_proj.cmp.").replace(".attn.v_proj.", ".attn.v_proj.cmp.")
        assert torch.equal(value, nsa_state[key]), name
    with pytest.raises(ValueError, match="twins"):
        copy_twin_init(nsa_model, RetrievalLM(config.model.replace(attention="dense", d_model=32)))
    with pytest.raises(ValueError, match="from an NSA model"):
        copy_twin_init(dense_model, nsa_model)
    # The trainer does it: with no learning rate the saved dense model is its step-0 state.
    frozen = config.replace(lr=0.0, weight_decay=0.0)
    models = {}
    for name in ("nsa", "dense"):
        models[name], _ = train_model(name, frozen, tmp_path, report=lambda line: None)
    dense_state, nsa_state = models["dense"].state_dict(), models["nsa"].state_dict()
    assert torch.equal(dense_state["blocks.0.attn.q_proj.weight"], nsa_state["blocks.0.attn.q_proj.weight"])
    assert torch.equal(dense_state["blocks.0.attn.k_proj.weight"], nsa_state["blocks.0.attn.k_proj.cmp.weight"])
    assert torch.equal(dense_state["embed.weight"], nsa_state["embed.weight"])
    unpaired, _ = train_model("dense", frozen.replace(paired_init=False), tmp_path, report=lambda line: None)
    assert not torch.equal(unpaired.state_dict()["blocks.0.attn.q_proj.weight"], nsa_state["blocks.0.attn.q_proj.weight"])


def test_parameter_groups_cover_every_parameter():
    model = _model("nsa", RetrievalTask(), tie_embeddings=False)
    groups = {name: parameter_group(name) for name, _ in model.named_parameters()}
    assert "other" not in groups.values()
    assert groups["blocks.0.attn.phi_k.mlp.0.weight"] == "attn_phi"
    assert groups["blocks.0.mlp.0.weight"] == "mlp"
    assert groups["blocks.1.attn.gate_proj.weight"] == "attn_gate"
    assert groups["head.weight"] == "head" and groups["prev_embed.weight"] == "embed"


@pytest.mark.parametrize("attention", ["nsa", "dense"])
@pytest.mark.parametrize("autocast", [False, True])
def test_one_train_step_is_finite_and_moves_parameters(attention, autocast):
    task = RetrievalTask(num_keys=8, num_values=8, num_filler=8, num_needles=3, num_queries=3)
    model = _model(attention, task)
    batch = make_batch(task, 4, 64, seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(batch.tokens, logits_at=batch.answer_positions, collect_info=True)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.answers.flatten())
    assert torch.isfinite(loss)
    loss.backward()
    norms = group_grad_norms(model)
    assert norms and all(math.isfinite(v) for v in norms.values())
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "embed.weight" in moved and any(".attn." in n for n in moved)
    if attention == "nsa":
        assert all(info is not None and set(info.gate_stats) == {"cmp", "slc", "win"}
                   for info in model.last_infos)
        assert all(abs(info.gate_stats["slc"][0] - 0.5) < 1e-2 for info in model.last_infos)


def test_retrieval_accuracy_counts_the_first_query():
    task = RetrievalTask(num_keys=8, num_values=8, num_filler=8, num_needles=2, num_queries=1)

    class Oracle(torch.nn.Module):
        """Answers by looking the key up in the haystack: always right."""

        def forward(self, tokens, logits_at):
            out = torch.zeros(*logits_at.shape, task.vocab_size)
            for row in range(tokens.shape[0]):
                key = tokens[row, logits_at[row, 0]]
                start = int((tokens[row, :-QUERY_LEN] == key).nonzero()[0])
                out[row, 0, tokens[row, start + 1]] = 1
            return out

    oracle = retrieval_accuracy(Oracle(), task, 60, 0.5, num_samples=10, batch_size=3, seed=0)
    assert oracle == RetrievalCount(10, 10)
    model = _model("dense", task)
    count = retrieval_accuracy(model, task, 60, None, num_samples=5, batch_size=2, seed=0,
                               needle_selection=True)
    assert count.total == 5 and 0 <= count.correct <= 5
    assert count.needle_selected == ()  # no NSA layer


def test_needle_block_selected_on_hand_made_selections():
    # Needles at 17..19 (block 2 of 8 tokens) and 15..17 (blocks 1 and 2); answers at position 40.
    batch = make_batch(RetrievalTask(num_keys=8, num_values=8, num_filler=8), 2, 48, seed=0)
    batch.needle_starts[:, 0] = torch.tensor([17, 15])
    batch.answer_positions[:, 0] = 40
    blocks = torch.full((2, 48, 2, 4), -1, dtype=torch.int64)
    blocks[:, 40, 0, :3] = torch.tensor([0, 1, 3])  # head 0: block 1 (second needle's start), no block 2
    assert needle_block_selected(blocks, batch, 8).tolist() == [False, True]
    blocks[0, 40, 1, 0] = 2  # another head reads the first needle's block
    assert needle_block_selected(blocks, batch, 8).tolist() == [True, True]
    blocks[1, 40] = -1
    blocks[1, 39, 0, 0] = 1  # the block chosen at another position does not count
    assert needle_block_selected(blocks, batch, 8).tolist() == [True, False]
    # Another query: its own needle and answer position.
    two = make_batch(RetrievalTask(num_keys=8, num_values=8, num_filler=8, num_needles=2, num_queries=2),
                     1, 48, seed=0)
    two.needle_starts[0] = torch.tensor([9, 25])  # blocks 1 and 3
    two.answer_positions[0] = torch.tensor([40, 43])
    blocks = torch.full((1, 48, 1, 2), -1, dtype=torch.int64)
    blocks[0, 40, 0, 0] = 3  # at query 0's position: query 1's block, not its own
    blocks[0, 43, 0, 0] = 3
    assert needle_block_selected(blocks, two, 8, query=0).tolist() == [False]
    assert needle_block_selected(blocks, two, 8, query=1).tolist() == [True]


@pytest.mark.parametrize("context, depth", [(128, 0.0), (128, 1.0), (32, 0.5)])
def test_needle_selection_counts_forced_and_dense_selections(context, depth):
    # Oracles from the spec, not from the model: block 0 and the query's own and previous blocks are
    # always selected (depths 0 and 1), and at 32 tokens n * l' covers every block.
    task = RetrievalTask(num_keys=8, num_values=8, num_filler=8)
    model = _model("nsa", task).eval()
    count = retrieval_accuracy(model, task, context, depth, num_samples=6, batch_size=4, seed=1,
                               needle_selection=True)
    assert count.needle_selected == (6, 6)
    assert model.last_infos == []


def test_needle_selection_is_measured_at_middle_depths():
    task = RetrievalTask(num_keys=8, num_values=8, num_filler=8)
    model = _model("nsa", task).eval()
    count = retrieval_accuracy(model, task, 256, 0.5, num_samples=16, batch_size=8, seed=2,
                               needle_selection=True)
    # 32 blocks, 4 selected (3 forced): an untrained model finds the needle's block rarely, never always.
    assert len(count.needle_selected) == 2 and all(0 <= hits < 16 for hits in count.needle_selected)


# ----- training pieces -------------------------------------------------------------------------


def test_learning_rate_and_context_schedules():
    config = tiny_config(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, context=128, start_context=32,
                         context_warmup=0.5)
    assert learning_rate(0, 100, config) == pytest.approx(1e-4)
    assert learning_rate(9, 100, config) == pytest.approx(1e-3)
    assert learning_rate(100, 100, config) == pytest.approx(1e-4)
    assert learning_rate(55, 100, config) == pytest.approx(5.5e-4)
    # 32 -> 64 -> 128 in two stages of 25 steps.
    assert [context_at(s, 100, config) for s in (0, 24, 25, 49, 50, 99)] == [32, 32, 64, 64, 128, 128]
    assert context_at(0, 100, config.replace(start_context=None)) == 128
    with pytest.raises(ValueError, match="start_context"):
        tiny_config(start_context=16)
    with pytest.raises(ValueError, match="start_context"):
        tiny_config(start_context=128)


def test_step_milliseconds_from_elapsed_times():
    # Steps of 100 ms, one holding a 900 ms evaluation, and a gap of two steps (rows not logged).
    elapsed = {0: 0.0, 1: 0.1, 2: 0.2, 3: 1.2, 4: 1.3, 6: 1.5}
    rows = [{"step": step, "elapsed_s": t} for step, t in elapsed.items()]
    times = step_milliseconds(rows)
    assert times["step_ms_median"] == pytest.approx(100.0)
    assert times["step_ms_p90"] == pytest.approx(1000.0)
    assert all(math.isnan(v) for v in step_milliseconds(rows[:1]).values())


def test_log_table_round_trips(tmp_path):
    rows = [{"model": "nsa", "step": 0, "loss": 4.1, "lr": 1e-4, "grad_norm/mlp": 0.5, "gate_mean/cmp": 0.5,
             "skipped": False},
            {"model": "dense", "step": 0, "loss": float("nan"), "lr": 1e-4, "grad_norm/mlp": 0.25,
             "skipped": True}]
    path = write_table(rows, tmp_path / "log.parquet", LOG_BASE_COLUMNS)
    back = read_table(path)
    assert len(back) == 2
    assert back[0]["gate_mean/cmp"] == 0.5 and back[1]["gate_mean/cmp"] is None
    assert math.isnan(back[1]["loss"]) and back[1]["skipped"] is True and back[0]["step"] == 0
    assert back[0]["eval_accuracy"] is None  # base columns are always present
    assert not list(tmp_path.glob(".*tmp"))


def test_cli_tiny_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(train_command, [
        "--tiny", "--model", "both", "--steps", "24", "--device", "cpu", "--out", str(out),
        "--eval-contexts", "64", "--eval-depths", "0,100", "--eval-samples", "4", "--hold-loss", "9.5"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("train_log.parquet", "retrieval.parquet", "loss.png", "summary.json", "retrieval_nsa.png",
                 "checkpoints/nsa.pt", "checkpoints/dense.pt", "weights_nsa.pt", "weights_dense.pt"):
        assert (out / name).is_file(), name
    # The weights file is the checkpoint's model without optimizer or loop state.
    from nsa.models.train import load_model

    for model in ("nsa", "dense"):
        (full, step), (small, small_step) = (load_model(out / p) for p in (f"checkpoints/{model}.pt",
                                                                           f"weights_{model}.pt"))
        assert step == small_step == 24
        tokens = torch.randint(0, full.config.vocab_size, (1, 40))
        assert torch.equal(full(tokens), small(tokens))
        sizes = [(out / p).stat().st_size for p in (f"weights_{model}.pt", f"checkpoints/{model}.pt")]
        assert sizes[0] < 0.6 * sizes[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["nsa"]["steps"] == summary["models"]["dense"]["steps"] == 24
    assert summary["goals"]["finite_goal_met"] is True
    assert summary["goals"]["nsa_min_needle_selected_longest"] == {"layer0": 1.0}  # depths 0, 100%: forced
    assert summary["config"]["hold_loss"] == 9.5
    log = read_table(out / "train_log.parquet")
    for model in ("nsa", "dense"):  # step times from the log's elapsed_s, in the summary and the table
        times = step_milliseconds([r for r in log if r["model"] == model])
        info = summary["models"][model]
        assert info["step_ms_median"] == times["step_ms_median"] > 0
        assert info["step_ms_p90"] == times["step_ms_p90"] >= info["step_ms_median"]
    assert "ms per step" in result.output
    assert len(log) == 48 and {r["model"] for r in log} == {"nsa", "dense"}
    nsa_rows = [r for r in log if r["model"] == "nsa"]
    assert nsa_rows[0]["gate_mean/slc"] == pytest.approx(0.5, abs=1e-3)
    # The selection overlap is logged with the gate statistics: a tile's distinct blocks per list
    # lie between 1 (every position the same blocks) and the tile's positions (none shared).
    overlap = [r["selection_distinct/L0/tile4"] for r in nsa_rows if r["gate_mean/slc"] is not None]
    assert overlap and all(1.0 <= x <= 4.0 for x in overlap)
    assert all(r["selection_distinct/L0/tile16"] is None or 1.0 <= r["selection_distinct/L0/tile16"] <= 16.0
               for r in nsa_rows)
    assert all(math.isfinite(r["grad_norm/attn_phi"]) for r in nsa_rows)
    evals = read_table(out / "retrieval.parquet")
    assert {(r["model"], r["task"], r["depth"]) for r in evals} >= {("nsa", "single", 0.0), ("dense", "single", 1.0)}
    assert all(r["status"] == "ok" and r["correct"] <= 4 for r in evals)
    # Depths 0 and 100% lie in forced blocks: the one NSA layer selected every needle; dense has no column.
    assert all(r["needle_selected_layer0"] == (1.0 if r["model"] == "nsa" else None) for r in evals)
    # The NSA heat map has a second panel (layer 0's selection rate): twice the dense one's width.
    from PIL import Image

    nsa_width, dense_width = (Image.open(out / f"retrieval_{m}.png").size[0] for m in ("nsa", "dense"))
    assert nsa_width > 1.8 * dense_width


def test_cli_report_lines_are_not_wrapped(tmp_path):
    depths = ",".join(str(d) for d in range(0, 101, 10))
    result = CliRunner().invoke(train_command, [
        "--tiny", "--model", "nsa", "--steps", "4", "--device", "cpu", "--out", str(tmp_path),
        "--eval-contexts", "64", "--eval-depths", depths, "--eval-samples", "1", "--hold-loss", "9.5"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = [line for line in result.output.splitlines() if "single retrieval at 64 tokens" in line]
    assert len(lines) == 1 and len(lines[0]) > 80 and "0%:" in lines[0] and "100%:" in lines[0]
    selected = [line for line in result.output.splitlines()
                if "single needle block selected at 64 tokens" in line]
    assert len(selected) == 1 and "100%:1.00" in selected[0]  # forced block at depth 100%


def test_cli_rejects_bad_options(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(train_command, ["--tiny", "--eval-depths", "0,150", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "--eval-depths" in bad.output
    bad = runner.invoke(train_command, ["--tiny", "--eval-contexts", "64,x", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "--eval-contexts" in bad.output
    bad = runner.invoke(train_command, ["--tiny", "--context", "20", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "context" in bad.output


def test_fit_schedule_fits_the_predicted_cost():
    config = tiny_config(steps=1000, context=128, start_context=32, context_warmup=0.5)
    per_token = 1e-4
    total = fit_schedule(10, per_token, 30.0, 32, config)
    cost = lambda t: sum(max(32, context_at(s, t, config)) for s in range(10, t)) * 16 * per_token
    assert 10 < total < 1000 and cost(total) <= 30.0 < cost(total + 1)
    assert fit_schedule(10, per_token, 1e9, 32, config) == 1000
    # Steps the hold kept at 32 tokens push the costlier stages later: more steps fit.
    held = fit_schedule(10, per_token, 30.0, 32, config, held=100)
    held_cost = lambda t: sum(max(32, context_at(s - 100, t, config)) for s in range(10, t)) * 16 * per_token
    assert held > total and held_cost(held) <= 30.0 < held_cost(held + 1)


def test_time_budget_stops_training_and_dense_replays_the_schedule(tmp_path):
    config = tiny_config(steps=5000, minutes=0.08, models=("nsa", "dense"))
    _, nsa_run = train_model("nsa", config, tmp_path, report=lambda line: None)
    assert 13 < nsa_run.steps < 5000 and nsa_run.schedule_steps < 5000
    assert nsa_run.train_seconds < 0.08 * 60 + 5
    _, dense_run = train_model("dense", config, tmp_path, replay=nsa_run, report=lambda line: None)
    assert dense_run.steps == nsa_run.steps
    assert [(r["lr"], r["context"]) for r in dense_run.rows] == [(r["lr"], r["context"]) for r in nsa_run.rows]


def test_loss_gated_context_warmup_advances_early(tmp_path):
    # A bound every loss meets: each stage ends after its 20 measured steps, long before the
    # step-count stages (21 steps each: 99% of 44 steps over two stages) would end it.
    config = tiny_config(steps=44, context=128, start_context=32, context_warmup=0.99, advance_loss=100.0,
                         eval_every=1000)
    lines = []
    _, run = train_model("nsa", config, tmp_path, report=lines.append)
    contexts = [r["context"] for r in run.rows]
    assert contexts[:20] == [32] * 20 and contexts[20:40] == [64] * 20 and contexts[40:] == [128] * 4
    assert any("context 32 -> 64" in line for line in lines)


def test_hold_keeps_the_context_while_the_loss_is_high(tmp_path):
    # A bound no loss meets (the tiny task starts near ln(vocab) >> 0.01): the step-count stages
    # (11 steps each: 50% of 44 steps over two stages) wait until hold_until = 50% of the schedule,
    # then resume where their clock stopped.
    config = tiny_config(steps=44, context=128, start_context=32, context_warmup=0.5, hold_loss=0.01,
                         hold_until=0.5, eval_every=1000)
    lines = []
    _, run = train_model("nsa", config, tmp_path, report=lines.append)
    contexts = [r["context"] for r in run.rows]
    assert contexts[:22] == [32] * 22 and contexts[22:33] == [64] * 11 and contexts[33:] == [128] * 11
    assert any("holding context 32 while the loss is above 0.01" in line for line in lines)
    # A bound every loss meets: a stage still waits for its 20 measured steps (the loss window),
    # then the clock goes on: 32 until step 20, 64 until step 40.
    _, run = train_model("nsa", config.replace(hold_loss=1e9, hold_until=1.0), tmp_path / "free",
                         report=lambda _: None)
    contexts = [r["context"] for r in run.rows]
    assert contexts[:20] == [32] * 20 and contexts[20:40] == [64] * 20 and contexts[40:] == [128] * 4
    # No hold: the plain step-count stages.
    _, run = train_model("nsa", config.replace(hold_loss=None), tmp_path / "none", report=lambda _: None)
    contexts = [r["context"] for r in run.rows]
    assert contexts[:11] == [32] * 11 and contexts[11:22] == [64] * 11 and contexts[22:] == [128] * 22


def test_sparse_warmup_scales_selection_and_window_with_the_context(tmp_path, monkeypatch):
    import nsa.models.train as train_module

    # Tiny pattern n = 6, w = 8 at 128 tokens: n(C) = max(3, 6C // 128), w(C) = max(1, 8C // 128).
    config = tiny_config(steps=44, context=128, start_context=32, context_warmup=0.5, sparse_warmup=True,
                         eval_every=15)
    assert [(p.select_count, p.window) for p in (nsa_pattern_at(c, config) for c in (32, 64, 128))] == [
        (3, 2), (3, 4), (6, 8)]
    assert nsa_pattern_at(32, config.replace(sparse_warmup=False)) == config.model.nsa
    seen_in_steps, seen_in_evals = [], []
    real_step, real_eval = train_module._forward_backward, train_module.retrieval_accuracy

    def patterns(model):
        return {(b.attn.config.select_count, b.attn.config.window) for b in model.blocks}

    def spy_step(model, batch, *args):
        seen_in_steps.append((batch.tokens.shape[1], patterns(model)))
        return real_step(model, batch, *args)

    def spy_eval(model, *args, **kwargs):
        seen_in_evals.append(patterns(model))
        return real_eval(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "_forward_backward", spy_step)
    monkeypatch.setattr(train_module, "retrieval_accuracy", spy_eval)
    model, run = train_model("nsa", config, tmp_path, report=lambda _: None)
    want = {32: {(3, 2)}, 64: {(3, 4)}, 128: {(6, 8)}}
    assert {length for length, _ in seen_in_steps} == {32, 64, 128}
    assert all(used == want[length] for length, used in seen_in_steps)
    assert [(r["context"], r["select_count"], r["window"]) for r in run.rows[::11]] == [
        (32, 3, 2), (64, 3, 4), (128, 6, 8), (128, 6, 8)]
    # The periodic accuracy checks (steps 15, 30) and the returned model use the model's own pattern.
    assert seen_in_evals == [{(6, 8)}, {(6, 8)}] and patterns(model) == {(6, 8)}
    # Off: the layers keep their own pattern at every context (and the log says so).
    seen_in_steps.clear()
    _, run = train_model("nsa", config.replace(sparse_warmup=False), tmp_path / "off", report=lambda _: None)
    assert all(used == {(6, 8)} for _, used in seen_in_steps)
    assert {(r["select_count"], r["window"]) for r in run.rows} == {(6, 8)}
    with pytest.raises(ValueError, match="select_count and window only"):
        set_nsa_pattern(model, config.model.nsa.replace(compress_block=8))
    with pytest.raises(ValueError, match="sparse_warmup"):
        tiny_config(sparse_warmup=1)


def test_first_step_failure_of_auto_backend_falls_back_to_reference(tmp_path, monkeypatch):
    import nsa.models.train as train_module

    real = train_module._forward_backward

    def failing_on_auto(model, *args):
        if model.config.backend == "auto":
            raise RuntimeError("kernel does not compile")
        return real(model, *args)

    monkeypatch.setattr(train_module, "_forward_backward", failing_on_auto)
    lines = []
    _, run = train_model("nsa", tiny_config(steps=3), tmp_path, report=lines.append)
    assert run.steps == 3 and run.backend == "reference"
    assert "RuntimeError: kernel does not compile" in run.backend_fallback
    assert any("continuing with backend='reference'" in line for line in lines)
    # A failure on the reference path too is not swallowed.
    monkeypatch.setattr(train_module, "_forward_backward", lambda *args: (_ for _ in ()).throw(
        RuntimeError("broken everywhere")))
    with pytest.raises(RuntimeError, match="broken everywhere"):
        train_model("nsa", tiny_config(steps=3), tmp_path, report=lines.append)


def test_cli_dense_replays_an_earlier_nsa_run(tmp_path):
    runner = CliRunner()
    common = ["--tiny", "--steps", "12", "--device", "cpu", "--eval-contexts", "64", "--eval-depths", "50",
              "--eval-samples", "2"]
    first = runner.invoke(train_command, [*common, "--model", "nsa", "--out", str(tmp_path / "nsa")])
    assert first.exit_code == 0, first.output
    # A run archived before a config field existed (here the task's adjacent_rate) still replays.
    summary_path = tmp_path / "nsa" / "summary.json"
    archived = json.loads(summary_path.read_text())
    del archived["config"]["task"]["adjacent_rate"]
    summary_path.write_text(json.dumps(archived))
    second = runner.invoke(train_command, [*common, "--model", "dense", "--replay", str(tmp_path / "nsa"),
                                           "--out", str(tmp_path / "dense")])
    assert second.exit_code == 0, second.output + repr(second.exception)
    summary = json.loads((tmp_path / "dense" / "summary.json").read_text())
    assert summary["models"]["nsa"]["replayed_from"] == str(tmp_path / "nsa")
    assert summary["goals"]["equal_steps"] == 12 and "loss_ratio_nsa_over_dense" in summary["goals"]
    log = read_table(tmp_path / "dense" / "train_log.parquet")
    by_model = {m: [(r["lr"], r["context"]) for r in log if r["model"] == m] for m in ("nsa", "dense")}
    assert len(by_model["dense"]) == 12 and by_model["dense"] == by_model["nsa"]
    assert {r["model"] for r in read_table(tmp_path / "dense" / "retrieval.parquet")} == {"nsa", "dense"}
    bad = runner.invoke(train_command, [*common, "--model", "dense", "--seed", "3", "--replay",
                                        str(tmp_path / "nsa"), "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "seed" in bad.output
    bad = runner.invoke(train_command, [*common, "--model", "both", "--replay", str(tmp_path / "nsa"),
                                        "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--replay" in bad.output


def _losses(path: Path, model: str) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["context"], r["grad_norm"])
            for r in read_table(path) if r["model"] == model]


def test_run_in_legs_equals_one_run_bit_for_bit(tmp_path):
    """Legs of a fraction of a second each (time-based, so they end at arbitrary steps, inside
    warm-up stages and between checkpoints), each resumed from the last: the same losses,
    learning rates, contexts, gradient norms and retrieval results as one uninterrupted run."""
    config = tiny_config(steps=40, models=("nsa", "dense"), eval_contexts=(64,), eval_depths=(0.5, 1.0),
                         eval_samples=4, checkpoint_every=15, log_every=5, eval_every=20)
    whole = run_training(config, tmp_path / "whole", report=lambda _: None)
    legs = [run_training(config, tmp_path / "legs", report=lambda _: None, leg_minutes=0.4 / 60)]
    while legs[-1]["status"] == "paused":
        assert len(legs) < 200
        legs.append(run_training(resume_config(tmp_path / "legs"), tmp_path / "legs", report=lambda _: None,
                                 resume=True, leg_minutes=0.4 / 60))
    assert len(legs) >= 3, "the legs must actually split the run"
    assert legs[0]["goals"] is None and legs[-1]["status"] == whole["status"] == "done"
    for model in ("nsa", "dense"):
        assert _losses(tmp_path / "legs" / "train_log.parquet", model) == \
            _losses(tmp_path / "whole" / "train_log.parquet", model)
        assert legs[-1]["models"][model]["steps"] == 40
    cells = lambda d: sorted((r["model"], r["task"], r["depth"], r["correct"]) for r in read_table(d / "retrieval.parquet"))
    assert cells(tmp_path / "legs") == cells(tmp_path / "whole")
    assert legs[-1]["goals"] == whole["goals"]


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither summary.json nor checkpoints"):
        resume_config(tmp_path / "empty")
    config = tiny_config(steps=6, eval_contexts=(64,), eval_depths=(0.5,), eval_samples=2)
    run_training(config, tmp_path / "run", report=lambda _: None, leg_minutes=1e-6)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "paused"
    with pytest.raises(ValueError, match="different run configuration"):
        run_training(config.replace(lr=1e-2), tmp_path / "run", resume=True, report=lambda _: None)
    with pytest.raises(ValueError, match="leg_minutes"):
        run_training(config, tmp_path / "run", resume=True, leg_minutes=0.0, report=lambda _: None)
    state = torch.load(tmp_path / "run" / "checkpoints" / "nsa.pt", weights_only=False)
    torch.save({**state, "resume": None}, tmp_path / "run" / "checkpoints" / "nsa.pt")
    with pytest.raises(ValueError, match="no loop state"):
        run_training(config, tmp_path / "run", resume=True, report=lambda _: None)
    (tmp_path / "run" / "checkpoints" / "nsa.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        run_training(config, tmp_path / "run", resume=True, report=lambda _: None)


def test_cli_leg_minutes_then_resume(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "run")
    first = runner.invoke(train_command, ["--tiny", "--model", "nsa", "--steps", "12", "--device", "cpu",
                                          "--eval-contexts", "64", "--eval-depths", "50", "--eval-samples", "2",
                                          "--leg-minutes", "0.00001", "--out", out])
    assert first.exit_code == 0, first.output + repr(first.exception)
    assert "nsa train --resume --out" in first.output
    bad = runner.invoke(train_command, ["--resume", "--steps", "5", "--out", out])
    assert bad.exit_code != 0 and "--steps" in bad.output
    bad = runner.invoke(train_command, ["--resume", "--out", str(tmp_path / "nothing")])
    assert bad.exit_code != 0 and "--out" in bad.output
    second = runner.invoke(train_command, ["--resume", "--out", out])
    assert second.exit_code == 0, second.output + repr(second.exception)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["models"]["nsa"]["steps"] == 12
    assert summary["goals"]["finite_goal_met"] is True
    assert len(read_table(tmp_path / "run" / "train_log.parquet")) == 12


def test_resumed_dense_twin_keeps_replaying(tmp_path):
    """A dense twin replaying an NSA run, paused and resumed: it still replays that run (same
    steps, learning rates, contexts) and the outputs cover both models."""
    runner = CliRunner()
    # NSA's schedule is fitted to a time budget, so the dense twin's own (3000 steps) would differ.
    common = ["--tiny", "--steps", "3000", "--device", "cpu", "--eval-contexts", "64", "--eval-depths", "50",
              "--eval-samples", "2"]
    first = runner.invoke(train_command, [*common, "--minutes", "0.03", "--model", "nsa", "--out",
                                          str(tmp_path / "nsa")])
    assert first.exit_code == 0, first.output
    steps = json.loads((tmp_path / "nsa" / "summary.json").read_text())["models"]["nsa"]["steps"]
    assert 1 < steps < 3000
    out = str(tmp_path / "dense")
    leg = runner.invoke(train_command, [*common, "--model", "dense", "--replay", str(tmp_path / "nsa"),
                                        "--leg-minutes", "0.00001", "--out", out])
    assert leg.exit_code == 0 and "paused" in leg.output, leg.output
    done = runner.invoke(train_command, ["--resume", "--out", out])
    assert done.exit_code == 0, done.output + repr(done.exception)
    summary = json.loads((tmp_path / "dense" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["goals"]["equal_steps"] == steps
    log = read_table(tmp_path / "dense" / "train_log.parquet")
    by_model = {m: [(r["lr"], r["context"]) for r in log if r["model"] == m] for m in ("nsa", "dense")}
    assert len(by_model["dense"]) == steps and by_model["dense"] == by_model["nsa"]


def test_dense_twin_follows_a_paused_nsa_run_one_leg_behind(tmp_path):
    """The twin replays a paused NSA run as far as it has logged and pauses; resumed after NSA has
    gone on (twice) it follows it to the end, bit for bit the twin that replays the finished run
    in one go, with the goals of the pair."""
    config = tiny_config(steps=12, eval_contexts=(64,), eval_depths=(0.5,), eval_samples=2)
    nsa_dir, dense_dir = tmp_path / "nsa", tmp_path / "dense"
    quiet = {"report": lambda line: None}
    # A leg limit of ~0 stops after the first step of each call.
    assert run_training(config, nsa_dir, leg_minutes=1e-9, **quiet)["status"] == "paused"
    dense_config = config.replace(models=("dense",))
    first = run_training(dense_config, dense_dir, replay_dir=nsa_dir, **quiet)
    assert first["status"] == "paused" and first["goals"] is None
    assert first["models"]["dense"]["steps"] == first["models"]["nsa"]["steps"] == 1
    run_training(config, nsa_dir, resume=True, leg_minutes=1e-9, **quiet)  # NSA: step 2, paused
    second = run_training(dense_config, dense_dir, resume=True, **quiet)
    assert second["status"] == "paused" and second["models"]["dense"]["steps"] == 2
    assert run_training(config, nsa_dir, resume=True, **quiet)["status"] == "done"
    done = run_training(dense_config, dense_dir, resume=True, **quiet)
    assert done["status"] == "done" and done["goals"]["equal_steps"] == 12
    at_once = run_training(dense_config, tmp_path / "at-once", replay_dir=nsa_dir, **quiet)
    assert _losses(dense_dir / "train_log.parquet", "dense") == _losses(
        tmp_path / "at-once" / "train_log.parquet", "dense")
    assert done["goals"]["dense_final_loss"] == at_once["goals"]["dense_final_loss"]
    # Without allow_paused a paused run is refused, naming the way on.
    run_training(config, tmp_path / "paused", leg_minutes=1e-9, **quiet)
    with pytest.raises(ValueError, match="paused at step 1.*--resume"):
        load_model_run(tmp_path / "paused")


def test_selection_anneal_goes_from_dense_to_the_models_own_selection(tmp_path):
    """Tiny pattern (n = 6, l' = 8) at 128 tokens: 16 blocks (dense) before 25% of the schedule,
    a linear fall to 6 until 75%, then 6; the log records it, the returned model has its own n,
    and the warm-up's shorter contexts are dense at their own size (never below n)."""
    config = tiny_config(steps=40, context=128, start_context=None, selection_anneal=(0.25, 0.75), eval_every=1000)
    assert nsa_pattern_at(128, config, 0.0).select_count == 16
    assert nsa_pattern_at(128, config, 0.5).select_count == 11
    assert nsa_pattern_at(128, config, 0.75) == config.model.nsa
    assert nsa_pattern_at(32, config, 0.0).select_count == 6 and nsa_pattern_at(64, config, 0.1).select_count == 8
    model, run = train_model("nsa", config, tmp_path, report=lambda _: None)
    counts = [r["select_count"] for r in run.rows]
    assert counts[:10] == [16] * 10 and counts[30:] == [6] * 10 and counts[20] == 11
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert {b.attn.config.select_count for b in model.blocks} == {6}
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="selection_anneal must be"):
        tiny_config(selection_anneal=(0.8, 0.2))
    with pytest.raises(ValueError, match="cannot be combined"):
        tiny_config(selection_anneal=(0.2, 0.8), sparse_warmup=True)
    bad = CliRunner().invoke(train_command, ["--tiny", "--selection-anneal", "0.2", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--selection-anneal" in bad.output


def _first_batch_loss(model: RetrievalLM, config: TrainConfig) -> float:
    """``model``'s loss on the first training batch of ``config`` (the stream ``train_model`` draws)."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    batch = make_batch(config.task, config.batch_size, config.start_context or config.context, gen)
    with torch.no_grad():
        logits = model(batch.tokens, logits_at=batch.answer_positions)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.answers.flatten()))


def test_cli_second_stage_starts_from_saved_weights(tmp_path):
    from nsa.models.train import load_initial_weights, load_model

    first = tmp_path / "first"
    common = ["--tiny", "--device", "cpu", "--eval-contexts", "64", "--eval-depths", "100",
              "--eval-samples", "2"]
    result = CliRunner().invoke(train_command, [*common, "--model", "both", "--steps", "6",
                                                "--out", str(first)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = {name: load_model(first / f"weights_{name}.pt")[0] for name in ("nsa", "dense")}
    # A fresh draw from another seed differs; loaded, it is the saved model.
    fresh = RetrievalLM(saved["nsa"].config)
    tokens = torch.randint(0, fresh.config.vocab_size, (1, 40))
    assert not torch.equal(fresh(tokens), saved["nsa"](tokens))
    assert load_initial_weights(fresh, first / "weights_nsa.pt") == 6
    assert torch.equal(fresh(tokens), saved["nsa"](tokens))
    # Second stages: NSA alone from its file, and both twins from the directory. Each model's first
    # loss is its saved model's loss on that batch (the dense twin replays NSA's batches).
    stages = {"file": ["--model", "nsa", "--init-weights", str(first / "weights_nsa.pt")],
              "dir": ["--model", "both", "--init-weights", str(first)]}
    for stage, options in stages.items():
        out = tmp_path / stage
        result = CliRunner().invoke(train_command, [*common, *options, "--steps", "3", "--seed", "3",
                                                    "--adjacent-rate", "0.5", "--out", str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        config = TrainConfig.from_dict(json.loads((out / "summary.json").read_text())["config"])
        assert config.init_weights == options[-1] and config.task.adjacent_rate == 0.5
        log = read_table(out / "train_log.parquet")
        for name in config.models:
            first_row = next(r for r in log if r["model"] == name)
            assert first_row["loss"] == pytest.approx(_first_batch_loss(saved[name], config), rel=1e-5), name
    # A model configured differently, a file for two models, an unreadable file: errors naming the field.
    other = RetrievalLM(fresh.config.replace(d_model=fresh.config.d_model * 2))
    with pytest.raises(ValueError, match="init_weights.*configured as"):
        load_initial_weights(other, first / "weights_nsa.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="init_weights.*unreadable"):
        load_initial_weights(fresh, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="init_weights.*directory"):
        tiny_config(models=("nsa", "dense"), init_weights=str(first / "weights_nsa.pt"))


def test_cli_gate_lr_scale_zero_freezes_the_gates(tmp_path):
    result = CliRunner().invoke(train_command, [
        "--tiny", "--model", "nsa", "--steps", "30", "--gate-lr-scale", "0", "--eval-contexts", "64",
        "--eval-depths", "50", "--eval-samples", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["gate_lr_scale"] == 0.0
    logged = [r for r in read_table(tmp_path / "train_log.parquet") if r["gate_mean/cmp"] is not None]
    assert len(logged) >= 2 and all(r[f"gate_mean/{b}"] == pytest.approx(0.5, abs=1e-6)
                                    for r in logged for b in ("cmp", "slc", "win"))


def test_cli_eval_rope_scaling_adds_rows_per_method_beyond_the_training_context(tmp_path, monkeypatch):
    import nsa.models.train as train_module

    seen = []
    real = train_module.retrieval_accuracy

    def spy(model, task, context, depth, **kwargs):
        scalings = {block.attn.rope_scaling for block in model.blocks}
        assert len(scalings) == 1, "every layer runs the same RoPE"
        seen.append((context, scalings.pop()))
        return real(model, task, context, depth, **kwargs)

    monkeypatch.setattr(train_module, "retrieval_accuracy", spy)
    result = CliRunner().invoke(train_command, [
        "--tiny", "--model", "nsa", "--steps", "4", "--device", "cpu", "--out", str(tmp_path),
        "--eval-contexts", "64,128", "--eval-depths", "0,100", "--eval-samples", "2",
        "--eval-rope-scaling", "none,yarn,linear"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = read_table(tmp_path / "retrieval.parquet")
    cells = {(r["task"], r["context"], r["rope_scaling"]) for r in rows}
    # The training context (64) runs once, as trained; 128 once per method.
    assert cells == {(task, context, method) for task in ("single", "multikey")
                     for context, method in ((64, "none"), (128, "none"), (128, "yarn"), (128, "linear"))}
    assert len(rows) == 2 * 4 * 2
    from nsa.rope import RopeScaling

    assert set(seen) == {(64, None), (128, None), (128, RopeScaling("yarn", 2.0, 64)),
                         (128, RopeScaling("linear", 2.0, 64))}
    assert "single retrieval at 128 tokens (yarn RoPE)" in result.output
    goals = json.loads((tmp_path / "summary.json").read_text())["goals"]
    assert set(goals["nsa_by_rope_scaling"]) == {"none", "yarn", "linear"}
    met = [m for m, g in goals["nsa_by_rope_scaling"].items() if g["retrieval_goal_met"]]
    assert goals["nsa_retrieval_goal_met"] == bool(met)
    assert goals["nsa_retrieval_goal_method"] == (met[0] if met else None)
    bad = CliRunner().invoke(train_command, ["--tiny", "--eval-rope-scaling", "none,ntk",
                                             "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "eval_rope_scaling" in bad.output


def test_evaluation_past_its_budget_records_every_cell_as_not_run():
    from nsa.models.train import evaluate_retrieval

    config = tiny_config(eval_contexts=(64, 128), eval_depths=(0.0, 1.0), eval_rope_scaling=("none", "yarn"),
                         eval_minutes=1e-9)
    model = RetrievalLM(config.model)
    rows = evaluate_retrieval(model, "nsa", config, report=lambda line: None)
    # single and multikey x (64 none, 128 none, 128 yarn) x 2 depths, none dropped
    assert len(rows) == 2 * 3 * 2
    assert all(r["status"] == "not_run" and r["accuracy"] is None for r in rows)
    assert all(block.attn.rope_scaling is None for block in model.blocks)


def test_cli_train_join_checks_and_joins_side_by_side_twins(tmp_path):
    """NSA and the dense twin trained in separate commands with one fixed schedule, then joined:
    the same comparison as `--model both` in one process (on the CPU bit for bit), and a second
    stage whose twins start from a first-stage pair (the dense one a replay of NSA's)."""
    from cli.train_cmd import train_join

    runner = CliRunner()
    common = ["--tiny", "--steps", "12", "--device", "cpu", "--eval-contexts", "64", "--eval-depths", "50",
              "--eval-samples", "2"]

    def train(name: str, *options: str) -> Path:
        result = runner.invoke(train_command, [*common, *options, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return tmp_path / name

    def join(nsa_dir: Path, dense_dir: Path, name: str):
        return runner.invoke(train_join, [str(nsa_dir), str(dense_dir), "--out", str(tmp_path / name)])

    nsa_dir = train("nsa", "--model", "nsa")
    dense_dir = train("dense", "--model", "dense", "--eval-every", "5")
    both = train("both", "--model", "both")
    result = join(nsa_dir, dense_dir, "joined")
    assert result.exit_code == 0, result.output + repr(result.exception)
    joined = json.loads((tmp_path / "joined" / "summary.json").read_text())
    expected = json.loads((both / "summary.json").read_text())["goals"]
    assert joined["goals"]["equal_steps"] == expected["equal_steps"] == 12
    for key in ("nsa_final_loss", "dense_final_loss"):
        assert joined["goals"][key] == pytest.approx(expected[key], rel=1e-6), key
    joined_dense = _losses(tmp_path / "joined" / "train_log.parquet", "dense")
    assert joined_dense == _losses(both / "train_log.parquet", "dense")
    assert {r["model"] for r in read_table(tmp_path / "joined" / "retrieval.parquet")} == {"nsa", "dense"}
    for name in ("loss.png", "weights_nsa.pt", "weights_dense.pt"):
        assert (tmp_path / "joined" / name).is_file(), name
    assert joined["models"]["dense"]["joined_from"] == str(dense_dir)

    # Not twins: another seed; a time-fitted schedule; a schedule that differs at one step.
    result = join(nsa_dir, train("seed3", "--model", "dense", "--seed", "3"), "bad")
    assert result.exit_code != 0 and "seed: 0 vs 3" in result.output
    for name in ("nsa", "dense"):
        shutil.copytree(tmp_path / name, tmp_path / f"timed-{name}")
        summary = json.loads((tmp_path / f"timed-{name}" / "summary.json").read_text())
        summary["config"]["minutes"] = 0.1
        (tmp_path / f"timed-{name}" / "summary.json").write_text(json.dumps(summary))
    result = join(tmp_path / "timed-nsa", tmp_path / "timed-dense", "bad")
    assert result.exit_code != 0 and "minutes=0.1" in result.output
    shutil.copytree(dense_dir, tmp_path / "shifted")
    log = read_table(tmp_path / "shifted" / "train_log.parquet")
    log[5]["lr"] *= 2
    write_table(log, tmp_path / "shifted" / "train_log.parquet", LOG_BASE_COLUMNS)
    result = join(nsa_dir, tmp_path / "shifted", "bad")
    assert result.exit_code != 0 and "differ at step 5" in result.output

    # A second stage: each twin from its own first stage, the dense one a replay of NSA's.
    replay = train("replay", "--model", "dense", "--replay", str(nsa_dir))
    stage2 = ["--seed", "1", "--adjacent-rate", "0.5", "--steps", "6"]
    nsa2 = train("nsa2", "--model", "nsa", "--init-weights", str(nsa_dir), *stage2)
    dense2 = train("dense2", "--model", "dense", "--init-weights", str(replay), *stage2)
    result = join(nsa2, dense2, "joined2")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "joined2" / "summary.json").read_text())["goals"]["equal_steps"] == 6
    result = join(nsa2, train("dense2-alone", "--model", "dense", "--init-weights", str(dense_dir), *stage2),
                  "bad")
    assert result.exit_code != 0 and "replayed no NSA run" in result.output
    # NSA's second stage from a weights file of the replayed run (an archived one, say) also pairs.
    nsa2_file = train("nsa2-file", "--model", "nsa", "--init-weights", str(nsa_dir / "weights_nsa.pt"),
                      *stage2)
    result = join(nsa2_file, tmp_path / "dense2", "joined3")
    assert result.exit_code == 0, result.output + repr(result.exception)
