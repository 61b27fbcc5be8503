import numpy as np
import pytest
import torch

from gamma.config import Stage1Config, Stage2Config
from gamma.model.blocks import BlockRunner
from gamma.model.candidates import build_candidates
from gamma.quant import get_quantizer
from gamma.stage1.checkpoint import Checkpoint
from gamma.stage1.end_to_end import EndToEnd, next_token_kl, next_token_nll
from gamma.stage1.loop import TeacherForcing, learn_preferences, temperature_at
from gamma.stage1.proxy import FisherCosts, KeepFisher, costs_to_logits
from gamma.stage1.relaxation import MixedLinear, swapped
from gamma.stage1.rows import LogitRows
from gamma.stage1.shard import Shard
from gamma.stage1.teacher import capture_teacher
from gamma.stage2.projection import project
from gamma.stage2.scores import Scores, ScoreTable, ScoreTableError

BITS = [2, 3, 4]


@pytest.fixture(scope="module")
def setup(model_and_tokenizer, calibration):
    model = model_and_tokenizer[0]
    cands = build_candidates(model, get_quantizer("rtn"), BITS)
    proxy, kept = FisherCosts(model, cands), KeepFisher()
    teacher = capture_teacher(model, calibration[:, :64], on_fisher=lambda b, f: (proxy(b, f), kept(b, f)))
    teacher.fisher = kept.fisher
    linear = dict(model.named_modules())
    sizes = [tuple(linear[n].weight.shape) for n in cands]
    return model, teacher, cands, proxy.table, sizes


def cfg(**kw):
    base = dict(budget=3.25, steps=6, sequences_per_step=2, tokens_per_sequence=32, lr=0.05, checkpoint_every=2,
                multiplier_interval=2)
    base.update(kw)
    return Stage1Config(**base)


def init_for(setup, c):
    _, _, _, costs, sizes = setup
    return costs_to_logits(costs, [r * k for r, k in sizes], BITS, c.budget)


def test_stage1_meets_training_budget_and_weights_never_change(setup):
    model, teacher, cands, _, _ = setup
    before = {n: p.clone() for n, p in model.named_parameters()}
    c = cfg()
    r = learn_preferences(model, teacher, LogitRows(model, cands, BITS), c, init_for(setup, c))
    assert abs(r.expected_bits - c.budget) < 0.01
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert len(r.history["loss"]) == c.steps and np.isfinite(r.history["loss"]).all()
    assert r.scores.shape == (len(cands), 3) and np.allclose(np.exp(r.scores).sum(1), 1)


def test_proxy_initialisation_reproduces_proxy_assignment_before_any_step(setup):
    _, _, cands, costs, sizes = setup
    c = cfg()
    init = init_for(setup, c)
    names = list(cands)
    proxy = project(Scores(names, sizes, BITS, -costs), c.budget, Stage2Config())
    learned = Scores(names, sizes, BITS, torch.log_softmax(torch.tensor(init), -1).numpy())
    table = project(learned, c.budget, Stage2Config())
    differ = sum(proxy.assignment[n] != table.assignment[n] for n in names)
    assert differ <= 0.05 * len(names)  # the price term shifts only ties inside the window


def test_resumed_run_equals_uninterrupted(setup, tmp_path):
    model, teacher, cands, _, _ = setup
    c = cfg(relaxation="hard", steps=4)
    init = init_for(setup, c)
    rows = LogitRows(model, cands, BITS)
    full = learn_preferences(model, teacher, rows, c, init)
    ckpt = tmp_path / "stage1.ckpt"
    learn_preferences(model, teacher, rows, c, init, checkpoint=Checkpoint(ckpt, stop_after=2))  # "killed" after 2
    resumed = learn_preferences(model, teacher, rows, c, init, checkpoint=Checkpoint(ckpt))
    assert resumed.resumed_from == 2
    np.testing.assert_allclose(resumed.scores, full.scores, rtol=0, atol=1e-6)
    assert resumed.history["loss"] == pytest.approx(full.history["loss"])

    # A finished checkpoint of another run (other text, say) must not pass for this run's result.
    with pytest.warns(UserWarning, match="another Stage I run"):
        other = learn_preferences(model, teacher, rows, c, init, checkpoint=Checkpoint(ckpt, "other"))
    assert other.resumed_from == 0 and len(other.history["loss"]) == c.steps


def test_slow_steps_are_checkpointed_by_time_and_the_resume_says_from_where(setup, tmp_path, capsys):
    """A kill between step checkpoints of a slow model loses at most ``checkpoint_seconds``."""
    model, teacher, cands, _, _ = setup
    c = cfg(steps=5, checkpoint_every=100, checkpoint_seconds=1e-6)
    init, rows, ckpt = init_for(setup, c), LogitRows(model, cands, BITS), tmp_path / "stage1.ckpt"
    learn_preferences(model, teacher, rows, c, init, checkpoint=Checkpoint(ckpt, stop_after=3))
    resumed = learn_preferences(model, teacher, rows, c, init, checkpoint=Checkpoint(ckpt))
    assert resumed.resumed_from == 3 and "resumed from step 3 of 5" in "".join(capsys.readouterr())


def test_temperature_schedule_is_applied():
    c = cfg(temperature=2.0, temperature_end=0.5, steps=5)
    assert temperature_at(c, 0) == 2.0 and temperature_at(c, 4) == pytest.approx(0.5)
    assert temperature_at(c, 2) == pytest.approx(1.0)


def test_foreign_score_table_is_refused(setup, tmp_path):
    _, _, cands, _, sizes = setup
    names = list(cands)
    t = ScoreTable(names, sizes, BITS, np.zeros((len(names), 3)).tolist(), "abc", "def", {"name": "rtn"}, 3.0, {}, 0,
                   0.0, 10.0, 0.0)
    path = t.save(tmp_path / "scores.json")
    loaded = ScoreTable.load(path)
    loaded.check_matches(names, sizes, "abc")
    with pytest.raises(ScoreTableError, match="learned on model"):
        loaded.check_matches(names, sizes, "other-model")
    with pytest.raises(ScoreTableError, match="different module set"):
        loaded.check_matches(names[:-1], sizes[:-1], "abc")


def test_antithetic_draws_come_in_mirrored_pairs():
    from gamma.stage1.relaxation import PreferenceLogits

    logits = PreferenceLogits([f"m{i}" for i in range(400)], [2, 4], [1] * 400)  # equal logits: a coin per module
    draws = logits.straight_through_samples(1.0, torch.Generator().manual_seed(0), 4, antithetic=True)
    assert len(draws) == 4 and all(torch.equal(d.detach().sum(1), torch.ones(400)) for d in draws)
    picks = [d.detach().argmax(1) for d in draws]
    assert (picks[0] != picks[1]).all() and (picks[2] != picks[3]).all()  # u and 1 - u flip every coin
    independent = logits.straight_through_samples(1.0, torch.Generator().manual_seed(0), 2)
    agree = float((independent[0].argmax(1) == independent[1].argmax(1)).float().mean())
    assert 0.4 < agree < 0.6
    draws[0].sum().backward()  # straight-through: the gradient reaches the logits
    assert logits.alpha.grad is not None


def test_sampling_options_need_the_hard_relaxation():
    with pytest.raises(ValueError, match="relaxation='hard'"):
        cfg(samples=4)
    with pytest.raises(ValueError, match="must be even"):
        cfg(relaxation="hard", samples=3, antithetic=True)


def test_channel_fisher_averages_every_calibration_token_across_shards():
    from gamma.stage1.loss import channel_fisher
    from gamma.stage1.shard import Shard

    grads = [torch.randn(6, 10, 8) for _ in range(3)]
    whole = channel_fisher(grads, 6)
    for w, g in zip(whole, grads):
        torch.testing.assert_close(w, g.pow(2).mean(dim=(0, 1)))
    # two processes holding sequences 0::2 and 1::2, summed by the all-reduce
    parts = [[g[r::2] for g in grads] for r in range(2)]
    partial = [[g.pow(2).sum(dim=(0, 1)) for g in p] for p in parts]
    per_block = iter(range(3))

    def all_reduce(t):
        b = next(per_block)
        return partial[0][b] + partial[1][b]

    sharded = channel_fisher(parts[0], 6, Shard(0, 2, all_reduce))
    for a, b in zip(sharded, whole):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("options", [{"relaxation": "hard", "samples": 2, "antithetic": True},
                                     {"fisher_weight": "channel"}, {"loss": "end_to_end"}, {"loss": "next_token"}])
def test_stage1_options_change_the_optimisation_and_keep_the_budget(setup, options):
    model, teacher, cands, _, _ = setup
    base = cfg(steps=3, relaxation=options.get("relaxation", "soft"))
    c = cfg(steps=3, **options)
    plain = learn_preferences(model, teacher, LogitRows(model, cands, BITS), base, init_for(setup, base))
    varied = learn_preferences(model, teacher, LogitRows(model, cands, BITS), c, init_for(setup, c))
    assert abs(varied.expected_bits - c.budget) < 0.01
    assert varied.history["loss"] != pytest.approx(plain.history["loss"])
    assert not np.allclose(varied.scores, plain.scores)


def test_unclipped_proxy_initialisation_ranks_like_the_proxy_with_8_bit_candidates(setup):
    model, teacher, _, _, sizes = setup
    bits = [2, 3, 4, 8]
    cands = build_candidates(model, get_quantizer("rtn"), bits)
    proxy = FisherCosts(model, cands)
    proxy(0, teacher.fisher)
    costs = proxy.table
    names, n = list(cands), [r * k for r, k in sizes]
    proxy = project(Scores(names, sizes, bits, -costs), 3.0, Stage2Config()).assignment

    def differing(clip):
        init = costs_to_logits(costs, n, bits, 3.0, clip=clip)
        learned = Scores(names, sizes, bits, torch.log_softmax(torch.tensor(init), -1).numpy())
        table = project(learned, 3.0, Stage2Config()).assignment
        return sum(proxy[m] != table[m] for m in names)

    assert differing(0.0) <= 0.05 * len(names)  # the same ranking up to ties in the window
    assert differing(8.0) > differing(0.0)  # the clip hides how costly the worst candidates are


def test_zero_steps_return_the_proxy_initialised_table(setup):
    """``steps: 0`` is the untrained row of an ablation: the table is the proxy initialisation itself."""
    model, teacher, cands, _, _ = setup
    c = cfg(steps=0)
    init = init_for(setup, c)
    r = learn_preferences(model, teacher, LogitRows(model, cands, BITS), c, init)
    np.testing.assert_allclose(r.scores, torch.log_softmax(torch.tensor(init, dtype=torch.float32), -1).numpy(),
                               atol=1e-5)
    assert abs(r.expected_bits - c.budget) < 0.01 and r.history["loss"] == []
    with pytest.raises(ValueError, match="steps=0 keeps the initial table"):
        cfg(steps=0, init="uniform")


def test_a_table_from_another_quantizer_or_candidate_set_is_refused_by_field():
    """A GPTQ table is never projected for an RTN run, nor a 2/3/4 table for a 4/8 run."""
    mods, sizes = ["a", "b"], [(4, 8), (4, 8)]
    rtn = {"name": "rtn", "group_size": 64, "symmetric": False}
    table = ScoreTable(mods, sizes, BITS, [[0.0, 0.0, 0.0]] * 2, "m", "t", rtn, 3.0, {}, 0, 0.0, 1.0, 0.0)
    table.check_matches(mods, sizes, "m", BITS, rtn)  # the same: accepted
    for run, field in (({**rtn, "name": "gptq"}, "name"), ({**rtn, "group_size": 128}, "group_size"),
                       ({**rtn, "symmetric": True}, "symmetric")):
        with pytest.raises(ScoreTableError, match=f"quantizer {field}="):
            table.check_matches(mods, sizes, "m", BITS, run)
    with pytest.raises(ScoreTableError, match=r"candidates \[2, 3, 4\].*\[4, 8\]"):
        table.check_matches(mods, sizes, "m", [4, 8], rtn)


@pytest.mark.parametrize("final", ["end_to_end", "next_token"])
def test_end_to_end_gradients_equal_autograd_through_the_models_own_forward(setup, calibration, final):
    """The block-streamed chain (forward with inputs kept, the KL or the next-token loss at the
    head, backward block by block with recomputation) gives each mix the gradient that autograd
    through ``model()`` gives it, with every module's weight the same mix of its candidates."""
    model, teacher, cands, _, _ = setup
    c = cfg(loss=final, tokens_per_sequence=48, relaxation="hard")
    rows = LogitRows(model, cands, BITS)
    mix = torch.softmax(torch.randn(len(cands), len(BITS), generator=torch.Generator().manual_seed(3)), -1)
    batch = torch.tensor([0, 2])
    forcing = TeacherForcing(BlockRunner(model), teacher, rows, c, Shard(sequences=teacher.hidden[0].shape[0]))
    (streamed,), loss = EndToEnd(forcing).loss_gradients([mix], batch)

    ids = calibration[batch, :48]  # the capture's sequences
    with torch.no_grad():
        target = model(input_ids=ids).logits
    mixed = {n: MixedLinear(rows.dense(n, torch.device("cpu")), dict(model.named_modules())[n].bias) for n in cands}
    for i, n in enumerate(cands):
        mixed[n].set_mix(mix[i])
    with swapped(model, mixed), torch.enable_grad():
        logits = model(input_ids=ids).logits
        # next_token: position 47 predicts the capture's token 48, beyond the loss's 48 positions
        direct_loss = next_token_kl(logits, target) if final == "end_to_end" else \
            next_token_nll(logits, calibration[batch, :49])
        direct_loss.backward()
    direct = torch.stack([mixed[n].mix_grad() for n in cands])
    assert loss == pytest.approx(float(direct_loss.detach()), rel=1e-4) and loss > 0
    torch.testing.assert_close(streamed, direct, rtol=2e-3, atol=1e-6 * float(direct.abs().max()))
