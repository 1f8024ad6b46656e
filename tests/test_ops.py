"""rlhf_magic.ops against plain Python loops (math.*, nested for-loops over batch and time) on random masked tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_magic import head_logprobs as head_module
from rlhf_magic import ops
from rlhf_magic.engine.kl_control import AdaptiveKLController, FixedKLController
from rlhf_magic.head_logprobs import logprobs_from_head

B, T, V = 5, 7, 11


def lengths_and_mask(gen: torch.Generator, b: int = B, t: int = T) -> tuple[list[int], torch.Tensor]:
    """Prefix masks; row 0 has a single real token, row 1 is full, the rest random."""
    lengths = [1, t, *torch.randint(1, t + 1, (b - 2,), generator=gen).tolist()]
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return lengths, mask


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def t64(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def ref_mean(x: list[list[float]], lengths: list[int]) -> float:
    vals = [x[b][t] for b in range(len(x)) for t in range(lengths[b])]
    return sum(vals) / len(vals)


def ref_var(x: list[list[float]], lengths: list[int], unbiased: bool) -> float:
    vals = [x[b][t] for b in range(len(x)) for t in range(lengths[b])]
    mu = sum(vals) / len(vals)
    return sum((v - mu) ** 2 for v in vals) / (len(vals) - (1 if unbiased else 0))


def fill_padding(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_var_whiten_match_loops(gen):
    lengths, mask = lengths_and_mask(gen)
    x = rand(gen, B, T)
    xl = x.tolist()
    assert_close(ops.masked_mean(x, mask), t64(ref_mean(xl, lengths)))
    rows = [sum(xl[b][: lengths[b]]) / lengths[b] for b in range(B)]
    assert_close(ops.masked_mean(x, mask, dim=1), t64(rows))
    for unbiased in (True, False):
        assert_close(ops.masked_var(x, mask, unbiased), t64(ref_var(xl, lengths, unbiased)))
    mu, sd = ref_mean(xl, lengths), math.sqrt(ref_var(xl, lengths, True) + 1e-8)
    want = [[(xl[b][t] - mu) / sd if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    assert_close(ops.masked_whiten(x, mask), t64(want))
    want_keep = [[(xl[b][t] - mu) / sd + mu if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    assert_close(ops.masked_whiten(x, mask, shift_mean=False), t64(want_keep))


def test_whiten_has_mean_0_var_1_and_shift_mean_false_keeps_the_mean(gen):
    _, mask = lengths_and_mask(gen)
    x = 3.0 + 2.0 * torch.randn(B, T, generator=gen)
    w = ops.masked_whiten(x, mask)
    assert_close(ops.masked_mean(w, mask), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert_close(ops.masked_var(w, mask), torch.tensor(1.0), atol=1e-4, rtol=0)
    kept = ops.masked_whiten(x, mask, shift_mean=False)
    assert_close(ops.masked_mean(kept, mask), ops.masked_mean(x, mask))
    assert_close(ops.masked_var(kept, mask), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_masked_stats_edge_cases():
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    x = torch.tensor([[2.0, float("nan")], [float("inf"), 5.0]])
    assert_close(ops.masked_mean(x, mask, dim=1), torch.tensor([2.0, 0.0]))  # empty row: 0, padding ignored
    assert_close(ops.masked_var(x, mask), torch.tensor(0.0))  # one element
    with pytest.raises(ValueError):
        ops.masked_var(x, torch.zeros(2, 2))
    assert ops.masked_mean(torch.ones(2, 2, dtype=torch.bfloat16), mask).dtype == torch.float32


# ---------------------------------------------------------------- log-probs, entropy


def ref_logsoftmax_at(row: list[float], k: int, temperature: float = 1.0) -> float:
    z = [v / temperature for v in row]
    top = max(z)
    return z[k] - (top + math.log(sum(math.exp(v - top) for v in z)))


def test_selective_log_softmax_equals_log_softmax_gather_fp32_and_bf16(gen):
    logits = 4 * torch.randn(B, T, V, generator=gen)
    index = torch.randint(0, V, (B, T), generator=gen)
    want = torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]
    assert_close(ops.selective_log_softmax(logits, index), want)
    assert_close(ops.selective_log_softmax(logits.double(), index), want.double(), atol=1e-5, rtol=1e-5)
    half = logits.bfloat16()
    got = ops.selective_log_softmax(half, index)
    assert got.dtype == torch.float32
    want_bf16 = torch.log_softmax(half, -1).gather(-1, index[..., None])[..., 0].float()
    assert_close(got, want_bf16, atol=0.1, rtol=0.02)
    assert_close(got, torch.log_softmax(half.float(), -1).gather(-1, index[..., None])[..., 0])


def test_logprobs_and_entropy_with_temperature_match_loops(gen):
    logits = 3 * rand(gen, B, T, V)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    lg, tk = logits.tolist(), tokens.tolist()
    for temp in (1.0, 0.7):
        want = [[ref_logsoftmax_at(lg[b][t], tk[b][t], temp) for t in range(T)] for b in range(B)]
        assert_close(ops.logprobs_from_logits(logits, tokens, temp), t64(want))
        ent = [
            [
                -sum(math.exp(lp) * lp for lp in (ref_logsoftmax_at(lg[b][t], k, temp) for k in range(V)))
                for t in range(T)
            ]
            for b in range(B)
        ]
        assert_close(ops.entropy_from_logits(logits, temp), t64(ent))
    assert_close(ops.entropy_from_logits(torch.zeros(2, V)), torch.full((2,), math.log(V)))
    with pytest.raises(ValueError):
        ops.logprobs_from_logits(logits, tokens, 0.0)


def test_logprobs_from_hidden_equal_log_softmax_of_the_full_logits(gen):
    hidden, weight = rand(gen, B, T, 5), rand(gen, V, 5)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    for bias in (None, rand(gen, V)):
        logits = hidden @ weight.T + (0 if bias is None else bias)
        for temp in (1.0, 0.7):
            lse = torch.logsumexp(logits / temp, -1)
            want = ops.logprobs_from_logits(logits, tokens, temp)
            assert_close(ops.logprobs_from_hidden(hidden, weight, bias, tokens, lse, temp), want)
    with pytest.raises(ValueError):
        ops.logprobs_from_hidden(hidden, weight, None, tokens, lse, 0.0)


@pytest.mark.parametrize("keep_bytes", [head_module.KEEP_LOGITS_BYTES, 0], ids=["kept-logits", "recomputed-logits"])
def test_logprobs_from_head_equal_log_softmax_of_the_logits_with_the_same_gradients(gen, keep_bytes, monkeypatch):
    """Vocabulary chunks of 4 (11 = 4 + 4 + 3) with an online logsumexp: values, entropy and the gradients for
    hidden, weight and bias all equal those of the full logits (float64, so exactly to rounding), whether the
    backward pass uses the kept logits or recomputes them."""
    monkeypatch.setattr(head_module, "KEEP_LOGITS_BYTES", keep_bytes)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    for bias_on in (False, True):
        hidden = (3 * rand(gen, B, T, 5)).requires_grad_()
        weight = rand(gen, V, 5).requires_grad_()
        bias = rand(gen, V).requires_grad_() if bias_on else None
        inputs = [hidden, weight] + ([bias] if bias_on else [])
        for temp in (1.0, 0.7):
            logits = hidden @ weight.T + (0 if bias is None else bias)
            want = ops.logprobs_from_logits(logits, tokens, temp)
            got = logprobs_from_head(hidden, weight, bias, tokens, temperature=temp, entropy=True, chunk=4)
            assert_close(got.logprobs, want)
            assert_close(got.entropy, ops.entropy_from_logits(logits.detach(), temp))
            upstream = rand(gen, B, T)
            assert_close(
                torch.autograd.grad((got.logprobs * upstream).sum(), inputs),
                torch.autograd.grad((want * upstream).sum(), inputs),
            )
        assert logprobs_from_head(hidden, weight, bias, tokens).entropy is None
    with pytest.raises(ValueError):
        logprobs_from_head(hidden, weight, None, tokens, temperature=0.0)


# ---------------------------------------------------------------- KL and rewards


def test_kl_estimators_match_formulas_and_k3_is_nonnegative(gen):
    lp, ref = rand(gen, B, T), rand(gen, B, T)
    a, r = lp.tolist(), ref.tolist()
    k1 = [[a[b][t] - r[b][t] for t in range(T)] for b in range(B)]
    k3 = [[(math.exp(r[b][t] - a[b][t]) - 1) - (r[b][t] - a[b][t]) for t in range(T)] for b in range(B)]
    assert_close(ops.kl_per_token(lp, ref, "k1"), t64(k1))
    assert_close(ops.kl_per_token(lp, ref, "k3"), t64(k3))
    wide = 10 * torch.randn(1000, generator=gen)
    assert (ops.kl_per_token(wide, torch.randn(1000, generator=gen), "k3") >= 0).all()
    assert (ops.kl_per_token(wide, wide + 1e-7, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        ops.kl_per_token(lp, ref, "k2")


def test_k1_and_k3_means_estimate_true_kl_when_sampling_from_the_policy():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        k = ops.kl_per_token(p.log()[x], q.log()[x], est)
        se = float(k.std()) / math.sqrt(len(x))
        assert abs(float(k.mean()) - true_kl) < 4 * se + 1e-4, est


def test_per_token_rewards_match_loop_and_empty_row(gen):
    lengths, mask = lengths_and_mask(gen)
    mask[2] = 0  # a row with no real token: all-zero rewards and kl, its score is dropped
    lengths[2] = 0
    scores, lp, ref = rand(gen, B), rand(gen, B, T), rand(gen, B, T)
    s, a, r = scores.tolist(), lp.tolist(), ref.tolist()
    for est, coef in (("k1", 0.1), ("k3", 0.3)):
        kl = [[0.0] * T for _ in range(B)]
        want = [[0.0] * T for _ in range(B)]
        for b in range(B):
            for t in range(lengths[b]):
                d = r[b][t] - a[b][t]
                kl[b][t] = -d if est == "k1" else math.exp(d) - 1 - d
                want[b][t] = -coef * kl[b][t] + (s[b] if t == lengths[b] - 1 else 0.0)
        rewards, got_kl = ops.per_token_rewards(scores, lp, ref, mask, coef, est)
        assert_close(rewards, t64(want))
        assert_close(got_kl, t64(kl))
    rewards, _ = ops.per_token_rewards(scores, lp, ref, torch.zeros(B, T), 0.1)
    assert_close(rewards, torch.zeros(B, T, dtype=torch.float64))


def test_truncate_after_eos_on_hand_written_rows():
    eos, pad = 2, 0
    rows = torch.tensor([[5, 6, 2, 7, 2, 8], [5, 6, 7, 8, 9, 2], [5, 6, 7, 8, 9, 4], [2, 5, 5, 5, 5, 5]])
    out, mask, has_eos = ops.truncate_after_eos(rows, eos, pad)
    assert out.tolist() == [[5, 6, 2, 0, 0, 0], [5, 6, 7, 8, 9, 2], [5, 6, 7, 8, 9, 4], [2, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1] * 6, [1, 0, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, False, True]
    with pytest.raises(ValueError):
        ops.truncate_after_eos(rows, 2, 2)


def test_missing_eos_penalty():
    scores, has_eos = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])
    assert_close(ops.apply_missing_eos_penalty(scores, has_eos, 1.5), torch.tensor([1.0, 0.5, 3.0]))
    assert ops.apply_missing_eos_penalty(scores, has_eos, None) is scores


# ---------------------------------------------------------------- GAE


def ref_gae(r, v, lengths, gamma, lam):
    adv = [[0.0] * len(r[0]) for _ in r]
    for b in range(len(r)):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = v[b][t + 1] if t + 1 < lengths[b] else 0.0
            last = r[b][t] + gamma * next_v - v[b][t] + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + v[b][t] if t < lengths[b] else 0.0 for t in range(len(r[0]))] for b in range(len(r))]
    return adv, ret


def test_gae_matches_loop_and_reward_to_go_for_gamma_lam_1(gen):
    lengths, mask = lengths_and_mask(gen)
    rewards, values = rand(gen, B, T), rand(gen, B, T)
    r, v = rewards.tolist(), values.tolist()
    for gamma, lam in ((0.9, 0.8), (1.0, 0.95), (1.0, 1.0)):
        adv, ret = ops.gae(rewards, values, mask, gamma, lam)
        want_adv, want_ret = ref_gae(r, v, lengths, gamma, lam)
        assert_close(adv, t64(want_adv))
        assert_close(ret, t64(want_ret))
    to_go = [[sum(r[b][t : lengths[b]]) - v[b][t] if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    assert_close(ops.gae(rewards, values, mask, 1.0, 1.0)[0], t64(to_go))


def test_gae_hand_computed_three_steps():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0]])  # the 4th position is padding
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # d2 = 2 - 1.5 = 0.5; d1 = 0.9*1.5 - 1 = 0.35, A1 = 0.35 + 0.72*0.5; d0 = 1 + 0.9 - 0.5, A0 = 1.4 + 0.72*0.71
    assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5, 0.0]]))
    assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0, 0.0]]))


# ---------------------------------------------------------------- PPO losses and metrics


def test_ppo_losses_and_explained_variance_match_loops(gen):
    lengths, mask = lengths_and_mask(gen)
    lp, old, adv = 0.3 * rand(gen, B, T), 0.3 * rand(gen, B, T), rand(gen, B, T)
    vals, old_vals, rets = rand(gen, B, T), rand(gen, B, T), rand(gen, B, T)
    c, cv = 0.2, 0.3
    real = [(b, t) for b in range(B) for t in range(lengths[b])]
    n = len(real)
    a, o, A = lp.tolist(), old.tolist(), adv.tolist()
    pg, clipped, kl, ratios = 0.0, 0, 0.0, []
    for b, t in real:
        ratio = math.exp(a[b][t] - o[b][t])
        l1, l2 = -A[b][t] * ratio, -A[b][t] * min(max(ratio, 1 - c), 1 + c)
        pg, clipped, kl = pg + max(l1, l2), clipped + (l2 > l1), kl + 0.5 * (a[b][t] - o[b][t]) ** 2
        ratios.append(ratio)
    got = ops.clipped_surrogate_loss(lp, old, adv, mask, c)
    assert_close(got.loss, t64(pg / n))
    assert_close(got.clipfrac, t64(clipped / n))
    assert_close(got.approx_kl, t64(kl / n))
    assert_close(got.ratio_mean, t64(sum(ratios) / n))
    assert_close(got.ratio_max, t64(max(ratios)))
    v, ov, R = vals.tolist(), old_vals.tolist(), rets.tolist()
    vl, vclip = 0.0, 0
    for b, t in real:
        vc = min(max(v[b][t], ov[b][t] - cv), ov[b][t] + cv)
        e1, e2 = (v[b][t] - R[b][t]) ** 2, (vc - R[b][t]) ** 2
        vl, vclip = vl + max(e1, e2), vclip + (e2 > e1)
    loss, frac = ops.clipped_value_loss(vals, old_vals, rets, mask, cv)
    assert_close(loss, t64(0.5 * vl / n))
    assert_close(frac, t64(vclip / n))
    diff = [[R[b][t] - v[b][t] for t in range(T)] for b in range(B)]
    ev = 1 - ref_var(diff, lengths, True) / ref_var(R, lengths, True)
    assert_close(ops.explained_variance(vals, rets, mask), t64(ev))


def test_padded_positions_change_no_loss_metric_or_gradient(gen):
    _, mask = lengths_and_mask(gen)
    x = {k: rand(gen, B, T) for k in ("lp", "old", "ref", "adv", "vals", "old_vals", "rets", "rewards")}
    scores = rand(gen, B)

    def everything(d: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        lp = d["lp"].clone().requires_grad_(True)
        pol = ops.clipped_surrogate_loss(lp, d["old"], d["adv"], mask, 0.2)
        (grad,) = torch.autograd.grad(pol.loss, lp)
        rewards, kl = ops.per_token_rewards(scores, d["lp"], d["ref"], mask, 0.1, "k3")
        adv, ret = ops.gae(d["rewards"], d["vals"], mask, 0.99, 0.95)
        return [
            *pol,
            grad,
            *ops.clipped_value_loss(d["vals"], d["old_vals"], d["rets"], mask, 0.2),
            ops.explained_variance(d["vals"], d["rets"], mask),
            rewards,
            kl,
            adv,
            ret,
            ops.masked_whiten(d["adv"], mask),
            ops.masked_mean(d["lp"], mask, dim=1),
            ops.masked_var(d["vals"], mask),
        ]

    base = everything(x)
    for junk in (1e3, -50.0, float("nan"), float("inf")):
        changed = everything({k: fill_padding(v, mask, junk) for k, v in x.items()})
        for want, got in zip(base, changed):
            assert_close(got, want)
    assert (base[5][~mask.bool()] == 0).all()  # no gradient reaches padding


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_exact_multiplier():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    assert ctl.update(7.0, 256) == pytest.approx(0.2 * (1 + (7 / 6 - 1) * 256 / 10_000))
    assert ctl.value > 0.2
    up = ctl.value
    ctl.update(torch.tensor(3.0), 512)  # error clipped to -0.2
    assert ctl.value == pytest.approx(up * (1 - 0.2 * 512 / 10_000))
    down = ctl.value
    ctl.update(100.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(down * (1 + 0.2 * 100 / 10_000))
    ctl.update(6.0, 100)
    assert ctl.value == pytest.approx(down * (1 + 0.2 * 100 / 10_000))
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05 and fixed.value == 0.05


# ---------------------------------------------------------------- ranking loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_ranking_loss_for_a_four_way_ranking_matches_the_six_pairs():
    scores = torch.tensor([2.0, -1.0, 0.5, -3.0])  # A, B, C, D, ranked A > C > B > D
    pairs = ops.ranking_pairs([[[0], [2], [1], [3]]])
    order = [0, 2, 1, 3]
    six = list(itertools.combinations(order, 2))
    assert list(zip(pairs.winners.tolist(), pairs.losers.tolist())) == six
    s = scores.tolist()
    for margin in (0.0, 1.0):
        want = -sum(log_sigmoid(s[w] - s[lo] - margin) for w, lo in six) / 6
        assert_close(ops.pairwise_ranking_loss(scores, *pairs, margin=margin), torch.tensor(want))
        assert_close(ops.pairwise_ranking_loss(scores, pairs.winners, pairs.losers, margin=margin), torch.tensor(want))
    assert_close(ops.pairwise_accuracy(scores, *pairs), torch.tensor(1.0))
    assert_close(ops.pairwise_accuracy(-scores, *pairs), torch.tensor(0.0))
    assert ops.ranking_pairs([[0, 2, 1, 3]]).winners.tolist() == pairs.winners.tolist()  # bare ints: groups of one


def test_ranking_loss_with_a_tie_and_a_two_prompt_batch():
    tie = ops.ranking_pairs([[[0], [2, 1], [3]]])  # A > B = C > D: B and C are not compared
    assert sorted(zip(tie.winners.tolist(), tie.losers.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    scores = torch.tensor([1.0, 0.3, -0.2, -1.0, 0.4, 0.9, -0.5])  # prompt 0: 4 answers, prompt 1: 3 answers
    batch = ops.ranking_pairs([[[0], [2, 1], [3]], [[1], [0], [2]]])
    s = scores.tolist()
    p0 = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    p1 = [(5, 4), (5, 6), (4, 6)]
    assert sorted(zip(batch.winners.tolist(), batch.losers.tolist())) == sorted(p0 + p1)
    for margin in (0.0, 0.5):
        per_prompt = [-sum(log_sigmoid(s[w] - s[lo] - margin) for w, lo in p) / len(p) for p in (p0, p1)]
        got = ops.pairwise_ranking_loss(scores, *batch, margin=margin)
        assert_close(got, torch.tensor(sum(per_prompt) / 2))
    acc = [sum(s[w] > s[lo] for w, lo in p) / len(p) for p in (p0, p1)]
    assert_close(ops.pairwise_accuracy(scores, *batch), torch.tensor(sum(acc) / 2))
    plain = sum(s[w] > s[lo] for w, lo in p0 + p1) / 8
    assert_close(ops.pairwise_accuracy(scores, batch.winners, batch.losers), torch.tensor(plain))
    pair_only = ops.ranking_pairs([[[0], [1]], [[1], [0]]])  # K = 2 preference pairs
    assert list(zip(pair_only.winners.tolist(), pair_only.losers.tolist())) == [(0, 1), (3, 2)]


def test_ranking_loss_gradient_flows_in_bf16():
    scores = torch.tensor([0.5, -0.5, 0.1], dtype=torch.bfloat16, requires_grad=True)
    loss = ops.pairwise_ranking_loss(scores, *ops.ranking_pairs([[[2], [0], [1]]]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert scores.grad is not None and scores.grad[2] < 0


@pytest.mark.parametrize(
    ("ranking", "sizes", "message"),
    [
        ([[0], [2], [3]], None, "missing"),
        ([[0], [1], [2]], [4], "missing"),
        ([[0], [1, 0]], None, "repeated"),
        ([[0], [5]], [2], "out of range"),
        ([[0]], None, "at least 2"),
        ([[0, 1]], None, "tied"),
        ([[0], "ab"], None, "rank groups"),
    ],
)
def test_invalid_rankings_raise(ranking, sizes, message):
    with pytest.raises(ValueError, match=message):
        ops.ranking_pairs([ranking], sizes)
