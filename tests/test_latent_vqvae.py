"""Tests of llmx.latent.vqvae (Token Assorted's VQ-VAE): quantiser, EMA, dead codes, training, prompt
conditioning, chunking, save/load, config validation."""

import pytest
import torch

from llmx.latent.vqvae import (VQVAE, VQVAEConfig, chunk_sequence, cot_chunks, collate,
                               encode_cot, evaluate_vqvae, load_vqvae, save_vqvae, train_vqvae, training_chunks)
from llmx.utils import LlmxError

torch.set_num_threads(1)
L = 16


def tiny(**kw) -> VQVAE:
    args = dict(vocab_size=30, pad_id=0, codebook_size=16, dim=32, layers=1, heads=2, dead_code_steps=20)
    args.update(kw)
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**args))


def pattern_items(n, patterns, seed, shifts=1, vocab=30):
    """Chunks: one of `patterns`, shifted by s in [0, shifts) (mod vocab, avoiding pad 0); prompt = [s + 1]."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        p = int(torch.randint(len(patterns), (1,), generator=g))
        s = int(torch.randint(shifts, (1,), generator=g))
        chunk = [(t - 1 + s) % (vocab - 1) + 1 for t in patterns[p]]
        items.append(([s + 1, 2, 3], torch.tensor(chunk), torch.ones(L, dtype=torch.bool)))
    return items


def make_patterns(k, vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (L,), generator=g).tolist() for _ in range(k)]


def test_bad_config_names_values():
    with pytest.raises(LlmxError, match=r"chunk_len \(16\).*compression \(5\)"):
        VQVAEConfig(vocab_size=10, pad_id=0, compression=5)
    with pytest.raises(LlmxError, match="codebook_update"):
        VQVAEConfig(vocab_size=10, pad_id=0, codebook_update="kmeans")
    cfg = VQVAEConfig(vocab_size=10, pad_id=0, chunk_len=16, compression=4)
    assert cfg.latents == 4 and VQVAEConfig.from_dict(cfg.to_dict()) == cfg


def test_quantize_picks_nearest_code():
    m = tiny(codebook_size=64).eval()
    z = torch.randn(5, 7, 32) * 0.3
    codes, zq, _ = m.quantize(z)
    d = torch.cdist(z.reshape(-1, 32).double(), m.codebook.detach().double()) ** 2
    chosen = d.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, d.min(1).values, rtol=1e-5, atol=1e-6)
    assert (codes.reshape(-1) == d.argmin(1)).float().mean() > 0.95  # ties within fp32 error aside
    assert torch.allclose(zq, m.codebook.detach()[codes], atol=1e-6)  # z + (e - z): rounding only


def test_straight_through_gradient_reaches_encoder():
    m = tiny(codebook_update="loss").train()
    b = collate(pattern_items(4, make_patterns(2), 0), 0)
    out = m(**b)
    out["recon_loss"].backward()  # reconstruction alone: only the straight-through path links it to f_enc
    g = m.encoder.layers[0].linear1.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert m.tok.weight.grad.abs().sum() > 0


def test_ema_update_matches_hand_computation():
    m = tiny(codebook_size=3, dim=2, heads=1, ema_decay=0.9, ema_eps=1e-5, dead_code_steps=0).train()
    book = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    m.codebook.data.copy_(book)
    m.ema_sum.copy_(book)
    m.ema_size.fill_(1.0)
    z = torch.tensor([[[0.1, 0.2], [0.9, -0.1], [1.2, 0.3]]])  # codes 0, 1, 1; code 2 unused
    codes, _, _ = m.quantize(z)
    assert codes.tolist() == [[0, 1, 1]]
    size = 0.9 * torch.ones(3) + 0.1 * torch.tensor([1.0, 2.0, 0.0])
    sums = 0.9 * book + 0.1 * torch.stack([z[0, 0], z[0, 1] + z[0, 2], torch.zeros(2)])
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 3 * 1e-5) * n
    assert torch.allclose(m.ema_size, size)
    assert torch.allclose(m.ema_sum, sums)
    assert torch.allclose(m.codebook.detach(), sums / smoothed[:, None], atol=1e-6)
    m.eval()  # eval mode leaves the codebook alone
    before = m.codebook.detach().clone()
    m.quantize(z)
    assert torch.equal(before, m.codebook.detach())


def test_dead_code_restart_moves_unused_code_onto_encoder_output():
    m = tiny(codebook_size=4, dim=2, heads=1, dead_code_steps=3).train()
    m.codebook.data.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 50.0]]))
    m.ema_sum.copy_(m.codebook.detach())
    z = torch.tensor([[[0.1, 0.0], [0.9, 1.1]]])
    for _ in range(2):
        m.quantize(z)
    assert m.unused_steps.tolist()[2:] == [2, 2]
    m.quantize(z)
    book = m.codebook.detach()
    for k in (2, 3):  # restarted exactly onto one of the (EMA-independent) encoder outputs
        assert any(torch.allclose(book[k], v) for v in z[0])
        assert torch.allclose(m.ema_sum[k], book[k]) and m.ema_size[k] == 1.0
    assert m.unused_steps.tolist() == [0, 0, 0, 0]


def test_tiny_vqvae_learns_patterns():
    pats = make_patterns(8)
    m = tiny()
    hist = train_vqvae(m, pattern_items(512, pats, 1), [], steps=200, batch_size=32, lr=3e-3, log=None)
    ev = evaluate_vqvae(m, pattern_items(64, pats, 2))
    assert ev["token_acc"] > 0.9, ev
    assert ev["codebook_usage"] * 16 >= 6, ev
    assert ev["perplexity"] > 5.0, ev
    assert hist["steps_per_s"] > 0 and len(hist["loss"]) == 4


def test_training_is_deterministic_given_seed():
    pats = make_patterns(4)
    out = []
    for _ in range(2):
        m = tiny()
        train_vqvae(m, pattern_items(64, pats, 1), [], steps=5, batch_size=8, log=None, log_every=5)
        out.append(m.codebook.detach().clone())
    assert torch.equal(out[0], out[1])


def zeroed_prompt_acc(m, items):
    b = collate(items, 0)
    with torch.no_grad():
        g = m.prompt_embedding(b["prompt_ids"], b["prompt_mask"])
        z = m.encode(b["chunk_ids"], b["chunk_mask"])
        _, zq, _ = m.quantize(z)
        with_p = (m.decode(zq, g).argmax(-1) == b["chunk_ids"]).float().mean()
        without = (m.decode(zq, torch.zeros_like(g)).argmax(-1) == b["chunk_ids"]).float().mean()
    return float(with_p), float(without)


def test_prompt_conditioning_matters():
    # 4 patterns x 4 prompt-given shifts = 16 chunk kinds, but only 4 codes: the shift must come from g(P)
    pats = make_patterns(4, seed=3)
    m = tiny(codebook_size=4, dead_code_steps=10)
    train_vqvae(m, pattern_items(512, pats, 1, shifts=4), [], steps=400, batch_size=32, lr=3e-3, log=None)
    m.eval()
    with_p, without = zeroed_prompt_acc(m, pattern_items(128, pats, 2, shifts=4))
    assert with_p > 0.8, (with_p, without)
    assert with_p > without + 0.3, (with_p, without)


def test_chunking_helpers():
    chunks, mask = chunk_sequence(list(range(1, 21)), L, pad_id=0)
    assert chunks.shape == (2, L) and mask.sum() == 20 and chunks[1, 4:].eq(0).all() and not mask[1, 4:].any()
    assert chunk_sequence([], L)[0].shape == (0, L)
    prompt, cot, sol = [7] * 5, list(range(1, 41)), [9] * 3
    items = training_chunks([(prompt, cot, sol)], L, pad_id=0)
    x = torch.cat([c[m] for _, c, m in items]).tolist()
    assert x == prompt + cot + sol and len(items) == 5 and all(p == prompt for p, _, _ in items)
    assert items[1][1].tolist() == cot[:16]  # C is chunked from its own start, as at application
    cc = cot_chunks(prompt, cot, L)
    assert len(cc) == 2 and torch.cat([c for _, c, _ in cc]).tolist() == cot[:32]  # 8-token tail dropped
    assert all(m.all() for _, _, m in cc)
    assert cot_chunks(prompt, cot[:15], L) == []


def test_collate_pads_prompts_right_and_truncates_left():
    c, m = torch.ones(L, dtype=torch.long), torch.ones(L, dtype=torch.bool)
    b = collate([([5, 6, 7, 8], c, m), ([9], c, m), ([], c, m)], pad_id=0, max_prompt_len=3)
    assert b["prompt_ids"].tolist() == [[6, 7, 8], [9, 0, 0], [0, 0, 0]]
    assert b["prompt_mask"].sum(1).tolist() == [3, 1, 0]
    model = tiny(max_prompt_len=3).eval()
    g = model.prompt_embedding(b["prompt_ids"], b["prompt_mask"])
    assert torch.isfinite(g).all() and g[2].abs().sum() == 0  # empty prompt -> zero vector, no NaN
    # g(P) ignores padding: a prompt alone equals the same prompt padded in a wider batch
    alone = model.prompt_embedding(torch.tensor([[9]]), torch.tensor([[True]]))
    assert torch.allclose(alone[0], g[1], atol=1e-5)


def test_encode_cot_matches_codes_for_and_save_load(tmp_path):
    pats = make_patterns(4)
    m = tiny()
    train_vqvae(m, pattern_items(64, pats, 1), [], steps=20, batch_size=16, log=None)
    examples = [([1, 2], pats[0] + pats[1] + [3, 4], [5]), ([3], pats[2][:10], []), ([4], pats[3], [6])]
    codes = encode_cot(m, examples, batch_size=2)
    assert [len(c) for c in codes] == [2, 0, 1]
    direct = m.codes_for(torch.tensor([pats[0], pats[1]]), torch.ones(2, L, dtype=torch.bool))
    assert codes[0] == direct[:, 0].tolist()
    save_vqvae(m, tmp_path / "vq", extra={"tokenizer": "abc"})
    m2 = load_vqvae(tmp_path / "vq", expect={"vocab_size": 30, "tokenizer": "abc", "codebook_size": 16})
    assert encode_cot(m2, examples) == codes
    assert torch.equal(m2.ema_size, m.ema_size) and torch.equal(m2.unused_steps, m.unused_steps)
    with pytest.raises(LlmxError, match=r"tokenizer='abc', expected 'xyz'"):
        load_vqvae(tmp_path / "vq", expect={"tokenizer": "xyz"})
    with pytest.raises(LlmxError, match=r"codebook_size=16, expected 1024"):
        load_vqvae(tmp_path / "vq", expect={"codebook_size": 1024})
    with pytest.raises(LlmxError, match="config.json missing"):
        load_vqvae(tmp_path / "nothing")
    out = m2.decode_codes(direct, torch.tensor([[1, 2], [1, 2]]), torch.ones(2, 2, dtype=torch.bool))
    assert out.shape == (2, L)


def test_multi_latent_chunks_encoder_prompt_and_loss_codebook():
    m = tiny(compression=4, encoder_prompt=True, codebook_update="loss").train()
    items = training_chunks([([1, 2, 3], list(range(4, 20)), [5, 6])], L, pad_id=0)[1:]  # C (16) and S (2)
    b = collate(items, 0)
    out = m(**b)
    assert out["codes"].shape == (2, 4) and out["logits"].shape == (2, L, 30)
    assert torch.isfinite(out["loss"]) and out["codebook_loss"] > 0
    out["loss"].backward()
    assert m.codebook.grad is not None and m.codebook.grad.abs().sum() > 0
    assert m.codes_for(**b).shape == (2, 4)
    with pytest.raises(LlmxError, match="encoder_prompt"):
        m.codes_for(b["chunk_ids"], b["chunk_mask"])


def test_prompt_embedding_keeps_last_tokens_of_long_prompts():
    model = tiny(max_prompt_len=3).eval()
    long = model.prompt_embedding(torch.tensor([[5, 6, 7, 8, 9], [4, 5, 0, 0, 0]]),
                                  torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool))
    short = model.prompt_embedding(torch.tensor([[7, 8, 9], [4, 5, 0]]),
                                   torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool))
    assert torch.allclose(long, short, atol=1e-6)
