"""llmx.rl.losses against float64 formulas, a per-token loop on a tiny Llama, and TRL's DPO loss."""

from __future__ import annotations

import collections
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmx.rl.losses import (
    ValueHead,
    bt_loss,
    critic_score,
    dpo_loss,
    nll_loss,
    segment_logps,
    token_logps,
    turn_advantages,
    value_loss,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def log_sigmoid64(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------- token_logps


def test_token_logps_float64_values_and_gradient_across_chunks():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 6))
    expected = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    got = token_logps(logits, ids, chunk_size=2)  # 5 positions per row: chunks of 2, 2, 1
    assert got.dtype == torch.float64 and got.shape == (2, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: token_logps(z, ids, chunk_size=2), (logits,))


def test_token_logps_bf16_within_input_rounding():
    torch.manual_seed(1)
    exact = torch.randn(3, 9, 50, dtype=torch.float64) * 4
    logits = exact.to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, 50, (3, 9))
    got = token_logps(logits, ids, chunk_size=4)
    assert got.dtype == torch.float32
    # on the bf16 values themselves the float32 math is exact to float32 precision ...
    on_bf16 = logits.detach().double().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), on_bf16, rtol=0, atol=2e-5)
    # ... and against the unrounded logits it is off by at most the inputs' rounding: bf16 keeps 8 bits, so
    # each logit moves by <= |z| 2^-8, and z_y - logsumexp(z) by at most twice the largest such move
    on_exact = exact.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    bound = 2 * exact.abs().amax(-1)[:, :-1] * 2.0**-8
    assert bool(((got.double() - on_exact).abs() <= bound).all())
    # the backward returns the logits' dtype and matches float64 autograd to bf16 precision
    (got * torch.linspace(-1, 1, 8)).sum().backward()
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = ref_logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    (ref * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-2, atol=1e-2 / 256)


PEAK_SCRIPT = """
import sys, torch
from llmx.rl.losses import token_logps
def rss(key):
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith(key))
def run(logits, ids):
    if sys.argv[1] == "naive":
        out = logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    else:
        out = token_logps(logits, ids)
    out.sum().backward()
def inputs(batch, length):
    logits = torch.randn(batch, length, 32000, dtype=torch.bfloat16, requires_grad=True)
    return logits, torch.randint(0, 32000, (batch, length))
run(*inputs(1, 4))  # loads the code and starts autograd's engine: not part of the peak
logits, ids = inputs(2, 256)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
base = rss("VmRSS")
run(logits, ids)
print(rss("VmHWM") - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak RSS")
def test_token_logps_peak_memory_below_naive_log_softmax():
    """Extra peak RSS of forward + backward on [2, 256, 32000] bf16 logits (31 MiB), each in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    peaks = {}
    for method in ("naive", "ours"):
        run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, method], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        peaks[method] = int(run.stdout.split()[-1])
    # naive holds float32 copies of the logits (log_softmax's output for the backward, and its gradient),
    # ours a float32 chunk and the gradient in bf16
    assert peaks["ours"] < 0.5 * peaks["naive"], peaks


def test_token_logps_rejects_bad_input():
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 5\).*max 5"):
        token_logps(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 5]]))
    with pytest.raises(ValueError, match="same B, T"):
        token_logps(torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------- segment_logps on a tiny Llama


def test_segment_logps_matches_per_token_loop_in_float64():
    model = tiny_llama()
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 14))
    # two agent turns per dialogue, separated by "user" tokens (0), of different lengths per row
    segments = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 2, 2, 2, 2, 2, 0, 0, 2]])
    with torch.no_grad():
        sums, counts = segment_logps(token_logps(model(input_ids=ids).logits, ids), segments, n_segments=3)
        logits64 = model.double()(input_ids=ids).logits
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected_counts = torch.zeros(2, 3, dtype=torch.long)
    for b in range(2):
        for t in range(1, 14):
            k = int(segments[b, t])
            if k:
                expected[b, k - 1] += logits64[b, t - 1].log_softmax(-1)[ids[b, t]]
                expected_counts[b, k - 1] += 1
    assert torch.equal(counts, expected_counts)
    assert counts[:, 2].tolist() == [0, 0] and sums[:, 2].tolist() == [0.0, 0.0]  # the absent third turn
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-5)


def test_segment_logps_rejects_bad_segments():
    tok = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"segment ids must lie in 0\.\.2.*max 3"):
        segment_logps(tok, torch.tensor([[0, 1, 3, 0]]), 2)
    with pytest.raises(ValueError, match=r"segments\[:, 0\] must be 0"):
        segment_logps(tok, torch.tensor([[1, 1, 0, 0]]), 2)
    with pytest.raises(ValueError, match=r"tok_logps \[B, T-1\]"):
        segment_logps(torch.zeros(1, 4), torch.tensor([[0, 1, 0, 0]]), 2)


# ---------------------------------------------------------------- critic: turn advantages, score, Bradley-Terry


def random_turns(seed: int):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (3, 4), generator=g)
    counts[0, 3] = 0  # a trajectory with fewer turns
    pol = -torch.rand(3, 4, generator=g, dtype=torch.float64) * counts
    ref = -torch.rand(3, 4, generator=g, dtype=torch.float64) * counts
    return pol, ref, counts


def test_critic_score_modes_match_float64_formulas():
    pol, ref, counts = random_turns(3)
    for b in range(3):
        turns = [(float(pol[b, t]), float(ref[b, t]), int(counts[b, t])) for t in range(4)]
        per_turn_means = sum((p - r) / n for p, r, n in turns if n)  # Eq. 2+3
        one_mean = sum(p - r for p, r, _ in turns) / sum(n for *_, n in turns)  # the reference code
        total = sum(p - r for p, r, _ in turns)
        assert critic_score(pol, ref, counts, "turn")[b].item() == pytest.approx(per_turn_means, rel=1e-12)
        assert critic_score(pol, ref, counts, "trajectory")[b].item() == pytest.approx(one_mean, rel=1e-12)
        assert critic_score(pol, ref, counts, "none")[b].item() == pytest.approx(total, rel=1e-12)
    adv = turn_advantages(pol, ref, counts, "turn")
    assert adv[0, 3].item() == 0.0  # a missing turn contributes nothing
    with pytest.raises(ValueError, match="normalize='mean': valid values are turn, trajectory, none"):
        critic_score(pol, ref, counts, "mean")


def test_bt_loss_values_and_gradient_sign():
    pol, ref, counts = random_turns(4)
    pol.requires_grad_(True)
    scores = critic_score(pol, ref, counts)
    loss = bt_loss(scores[:2], scores[1:], beta=0.1)  # pairs (0 > 1) and (1 > 2)
    for i in range(2):
        expected = -log_sigmoid64(0.1 * (scores[i].item() - scores[i + 1].item()))
        assert loss[i].item() == pytest.approx(expected, rel=1e-12)
    loss[0].backward()
    # descent raises the chosen trajectory's critic log-probs, lowers the rejected one's, touches no other
    assert bool((pol.grad[0][counts[0] > 0] < 0).all()) and bool((pol.grad[1][counts[1] > 0] > 0).all())
    assert bool((pol.grad[2] == 0).all())


# ---------------------------------------------------------------- DPO


def test_dpo_loss_values_rewards_and_gradient_sign():
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-20 * torch.rand(4, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    for i in range(4):
        margin = 0.5 * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert loss[i].item() == pytest.approx(-log_sigmoid64(margin), rel=1e-12)
        assert chosen[i].item() == pytest.approx(0.5 * (pc[i] - rc[i]).item(), rel=1e-12)
        assert rejected[i].item() == pytest.approx(0.5 * (pr[i] - rr[i]).item(), rel=1e-12)
    assert not chosen.requires_grad and not rejected.requires_grad
    loss.sum().backward()
    assert bool((pc.grad < 0).all()) and bool((pr.grad > 0).all())


def test_dpo_loss_matches_trl_dpo_trainer():
    """Our token_logps + segment_logps + dpo_loss against TRL's DPOTrainer._compute_loss, same models and batch.

    TRL (1.16) has no standalone DPO loss function: the sigmoid loss is computed inside
    `DPOTrainer._compute_loss(self, model, inputs, return_outputs)`, which we call unbound with a
    SimpleNamespace holding exactly the attributes it reads (the loss configuration, a metrics dict, and an
    accelerator whose gathers are the identity on one process). The policy is a real tiny Llama with TRL's
    own fused LM head, so TRL computes the policy log-probs itself; the reference log-probs are passed
    precomputed (TRL's `precompute_ref_logps` path) from our functions on a second tiny Llama.
    """
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    policy, reference = tiny_llama(0), tiny_llama(1)
    torch.manual_seed(6)
    pairs, length = 3, 12
    ids = torch.randint(0, 64, (2 * pairs, length))  # rows: chosen 0..2, then rejected 0..2 (TRL's layout)
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    completion[1, 9:] = 0  # completions of different lengths
    attention = torch.ones_like(ids)
    with torch.no_grad():
        ref_sums = segment_logps(token_logps(reference(input_ids=ids).logits, ids), completion, 1)[0][:, 0]
    pol_sums = segment_logps(token_logps(policy(input_ids=ids).logits, ids), completion, 1)[0][:, 0]
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    for beta in (0.1, 3.0):
        ours, chosen, rejected = dpo_loss(pol_sums[:pairs], pol_sums[pairs:], ref_sums[:pairs], ref_sums[pairs:], beta)
        for i in range(pairs):  # one pair per call: TRL reports batch means only
            rows = [i, pairs + i]
            trainer = types.SimpleNamespace(
                model=policy, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0], f_divergence_type="reverse_kl",
                ld_alpha=None, precompute_ref_logps=True, use_weighting=False, aux_loss_enabled=False,
                accelerator=types.SimpleNamespace(
                    device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
                ),
                _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
                _total_train_tokens=0, _tp_size=1,
            )
            inputs = dict(
                input_ids=ids[rows], attention_mask=attention[rows], completion_mask=completion[rows],
                ref_chosen_logps=ref_sums[i : i + 1], ref_rejected_logps=ref_sums[pairs + i : pairs + i + 1],
            )
            trl_loss = DPOTrainer._compute_loss(trainer, policy, inputs, False)
            metrics = trainer._metrics["eval"]  # the model is in eval mode
            assert ours[i].item() == pytest.approx(trl_loss.item(), abs=1e-5)
            assert chosen[i].item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-5)
            assert rejected[i].item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-5)
            assert pol_sums[i].item() == pytest.approx(metrics["logps/chosen"][0], abs=1e-4)
            assert pol_sums[pairs + i].item() == pytest.approx(metrics["logps/rejected"][0], abs=1e-4)
    assert (ours - math.log(2)).abs().max().item() > 0.1  # with beta 3 the pairs are far from a tie: a real check


# ---------------------------------------------------------------- NLL


def test_nll_loss_is_a_mean_over_sequences_of_token_means():
    tok = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -8.0, -1.5, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    per_seq = nll_loss(tok, mask)
    assert per_seq.tolist() == [2.5, 1.0, 0.0]  # (1+2+3+4)/4, (0.5+1.5)/2, no target
    assert per_seq[:2].mean().item() == 1.75  # the fork's reduction; a token-level mean would give 12/6 = 2
    # a mask aligned to input_ids ([B, T]) drops its first column
    aligned = torch.cat([torch.ones(3, 1, dtype=torch.long), mask], dim=1)
    assert torch.equal(nll_loss(tok, aligned), per_seq)
    with pytest.raises(ValueError, match=r"mask must be \[B, T-1\]"):
        nll_loss(tok, torch.ones(3, 7))


# ---------------------------------------------------------------- value head


def test_value_head_shape_and_padding_invariance():
    head = ValueHead(tiny_llama())
    torch.manual_seed(7)
    ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        head.head.weight.normal_()  # a head far from zero, so that a change in the pooled state shows
        alone = head(ids)
        right = head(torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1), torch.tensor([[1] * 6 + [0] * 3]))
        left = head(torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.tensor([[0] * 3 + [1] * 6]))
        other = head(torch.randint(1, 64, (1, 6)))
    assert alone.shape == (1,)
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
    assert abs(other.item() - alone.item()) > 1e-3  # the value depends on the tokens at all
    # a backbone without a separate decoder goes through output_hidden_states; the padding still does not count
    bare = ValueHead(tiny_llama().model)
    with torch.no_grad():
        values = bare(torch.cat([ids, ids]), torch.tensor([[1] * 6, [1] * 4 + [0] * 2]))
        torch.testing.assert_close(values[1:], bare(ids[:, :4]), rtol=0, atol=1e-5)
    assert values.shape == (2,)


def test_value_head_learns_to_separate_two_classes():
    head = ValueHead(tiny_llama())
    g = torch.Generator().manual_seed(8)
    ids = torch.cat([torch.randint(0, 32, (8, 7), generator=g), torch.randint(32, 64, (8, 7), generator=g)])
    labels = torch.cat([torch.zeros(8), torch.ones(8)])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    with torch.no_grad():
        start = value_loss(head(ids), labels).mean().item()
    assert start == pytest.approx(math.log(2), abs=0.01)  # the head starts near p = 0.5
    for _ in range(15):
        optimizer.zero_grad()
        value_loss(head(ids), labels).mean().backward()
        optimizer.step()
    with torch.no_grad():
        logits = head(ids)
    assert value_loss(logits, labels).mean().item() < 0.5 * start
    assert bool((logits[:8] < 0).all()) and bool((logits[8:] > 0).all())


def test_value_loss_is_bce_and_checks_labels():
    logits = torch.tensor([0.3, -1.2], dtype=torch.float64)
    got = value_loss(logits, torch.tensor([1.0, 0.0]))
    assert got.tolist() == pytest.approx([-log_sigmoid64(0.3), -log_sigmoid64(1.2)], rel=1e-12)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\].*max 2"):
        value_loss(logits, torch.tensor([2.0, 0.0]))
