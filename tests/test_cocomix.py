"""CoCoMix: concept labels by attribution against a dense autograd reference, the concept head against dense
float64 formulas, and the student's forward against Hugging Face's own forward (prediction only, interleaving at
block 0 through inputs_embeds), causality of the interleaved sequence, the loss, and the refusals."""

import pytest
import torch
import torch.nn.functional as F

from llmx.concept.attribution import LabelCache, build_label_cache, concept_labels, labels_fingerprint
from llmx.concept.cocomix import (CoCoMixLM, ConceptHead, cocomix_loss, concept_head_parameters, greedy_generate,
                                  kd_loss, matched_config, steered)
from llmx.concept.sae import SAEConfig, TopKSAE
from llmx.utils import LlmxError

VOCAB, D = 61, 32


def _llama(layers=3, attn="sdpa", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def _sae(layer=1, n=48, k=8):
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_model=D, n_latents=n, k=k, layer=layer))
    with torch.no_grad():
        sae.latent_bias.normal_(std=0.1)
    return sae.eval()


def _dense_reference(teacher, sae, ids):
    """dL/dh through a zero perturbation added at the block output, and the dense attribution over all latents."""
    delta = torch.zeros(*ids.shape, D, requires_grad=True)
    box = []

    def hook(_m, _i, out):
        box.append(out.detach())
        return out + delta

    handle = teacher.model.layers[sae.cfg.layer].register_forward_hook(hook)
    logits = teacher(input_ids=ids).logits
    handle.remove()
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    idx, val = sae.encode(box[0])
    z = sae.dense(idx, val)
    return (delta.grad @ sae.decoder.weight) * z, z


def test_attribution_labels_match_a_dense_autograd_reference():
    teacher, sae = _llama(), _sae()
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = concept_labels(teacher, sae, ids, top=4)
    attr, z = _dense_reference(teacher, sae, ids)
    assert labels.shape == (2, 9, 4)
    assert (labels[:, -1] == -100).all()  # the last residual influences no prediction: no attribution
    active = attr.masked_fill(z == 0, float("-inf"))
    want = active.topk(4, dim=-1).indices
    assert torch.equal(labels[:, :-1], want[:, :-1])
    # The labels are ranked by attribution, not by activation: at least some positions differ.
    by_activation = concept_labels(teacher, sae, ids, top=4, selection="activation")
    assert torch.equal(by_activation, sae.encode(sae_input(teacher, sae, ids))[0][..., :4])
    assert not torch.equal(by_activation[:, :-1], labels[:, :-1])


def sae_input(teacher, sae, ids):
    with torch.no_grad():
        return teacher(input_ids=ids, output_hidden_states=True).hidden_states[sae.cfg.layer + 1]


def test_padded_positions_are_unlabelled_and_bad_arguments_refused():
    teacher, sae = _llama(), _sae()
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = concept_labels(teacher, sae, ids, top=2, attention_mask=mask)
    assert (labels[1, 4:] == -100).all() and (labels[0, :5] >= 0).all()
    with pytest.raises(LlmxError, match="selection='value'"):
        concept_labels(teacher, sae, ids, selection="value")
    with pytest.raises(LlmxError, match="top=9"):
        concept_labels(teacher, sae, ids, top=9)
    with pytest.raises(LlmxError, match="SAE layer 3 outside"):
        concept_labels(teacher, _sae(layer=3), ids)


def test_concept_head_matches_dense_float64_formula():
    torch.manual_seed(0)
    head = ConceptHead(D, 40, k=5).double()
    with torch.no_grad():
        head.pre_bias.normal_()
    h = torch.randn(2, 7, D, dtype=torch.float64) * 3 + 1
    logits, c = head(h)
    mu = h.mean(-1, keepdim=True)
    sd = (h - mu).std(-1, keepdim=True) + head.eps
    want_logits = ((h - mu) / sd - head.pre_bias) @ head.predictor.weight.T + head.predictor.bias
    top = want_logits.topk(5, dim=-1)
    masked = torch.zeros_like(want_logits).scatter(-1, top.indices, top.values)
    want_c = (masked @ head.compress_weight + head.compress_bias + head.pre_bias) * sd + mu
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(c, want_c)
    # Gradient reaches only the kept logits' predictor rows through the compression.
    c.sum().backward()
    kept = torch.zeros(40, dtype=torch.bool)
    kept[top.indices.flatten()] = True
    assert float(head.predictor.weight.grad[~kept].abs().sum()) == 0.0
    assert float(head.predictor.weight.grad[kept].abs().sum()) > 0.0


def test_prediction_only_reproduces_the_hf_forward():
    lm = _llama()
    model = CoCoMixLM(lm, n_concepts=48, insert_layer=1, mix="none").eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        logits, concept_logits = model(ids)
        torch.testing.assert_close(logits, lm(input_ids=ids).logits)
    assert concept_logits.shape == (2, 8, 48)
    # The backbone keeps its HF parameter names (FSDP's parallelize and the HF export rely on it).
    from llmx.trainer.distributed import decoder_layers

    names = set(model.state_dict())
    assert {n for n in names if not n.startswith("concept.")} == set(lm.state_dict())
    assert len(decoder_layers(model)) == 3


@pytest.mark.parametrize("position", ["same", "sequential"])
def test_interleaving_at_block_0_matches_hf_on_the_interleaved_embeddings(position):
    lm = _llama()
    model = CoCoMixLM(lm, n_concepts=48, insert_layer=0, mix="interleave", concept_position=position).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        logits, _ = model(ids)
        e = lm.model.embed_tokens(ids)
        _, c = model.concept(e)
        mixed = torch.stack([e, c], dim=2).reshape(2, 12, D)
        pos = torch.arange(6).repeat_interleave(2)[None] if position == "same" else torch.arange(12)[None]
        ref = lm(inputs_embeds=mixed, position_ids=pos).logits[:, 1::2]
    torch.testing.assert_close(logits, ref)


@pytest.mark.parametrize("mix", ["interleave", "add"])
def test_student_is_causal_and_the_concept_path_is_trained(mix):
    model = CoCoMixLM(_llama(), n_concepts=48, insert_layer=1, mix=mix)
    ids = torch.randint(0, VOCAB, (1, 8))
    other = ids.clone()
    other[0, 5] = (ids[0, 5] + 1) % VOCAB
    with torch.no_grad():
        a, ca = model(ids)
        b, cb = model(other)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    torch.testing.assert_close(ca[:, :5], cb[:, :5])
    assert not torch.allclose(a[:, 5], b[:, 5])
    logits, concept_logits = model(ids)
    cocomix_loss(logits, concept_logits, ids, None)["loss"].backward()  # NTP alone reaches the compressor
    assert float(model.concept.compress_weight.grad.abs().sum()) > 0


def test_loss_is_ntp_plus_lambda_times_mean_concept_ce():
    torch.manual_seed(0)
    logits, concept_logits = torch.randn(2, 5, VOCAB), torch.randn(2, 5, 48)
    ids = torch.randint(0, VOCAB, (2, 5))
    labels = torch.randint(0, 48, (2, 5, 4))
    labels[:, -1] = -100
    out = cocomix_loss(logits, concept_logits, ids, labels, lam=0.1)
    ntp = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    ce = sum(F.cross_entropy(concept_logits[:, :-1].reshape(-1, 48), labels[:, :-1, j].reshape(-1))
             for j in range(4)) / 4
    torch.testing.assert_close(out["loss"], ntp + 0.1 * ce)
    empty = cocomix_loss(logits, concept_logits, ids, torch.full((2, 5, 4), -100))
    torch.testing.assert_close(empty["loss"], ntp)
    with pytest.raises(LlmxError, match="do not match the batch"):
        cocomix_loss(logits, concept_logits, ids, labels[:, :3])


def test_pause_baseline_interleaves_one_learned_vector():
    lm = _llama()
    model = CoCoMixLM(lm, n_concepts=48, insert_layer=0, mix="pause").eval()
    assert model.concept is None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in lm.parameters()) + D
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        logits, concept_logits = model(ids)
        e = lm.model.embed_tokens(ids)
        mixed = torch.stack([e, model.pause.expand_as(e)], dim=2).reshape(2, 10, D)
        ref = lm(inputs_embeds=mixed, position_ids=torch.arange(5).repeat_interleave(2)[None]).logits[:, 1::2]
    assert concept_logits is None
    torch.testing.assert_close(logits, ref)


def test_kd_loss_against_explicit_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, VOCAB), torch.randn(2, 6, VOCAB)
    ids = torch.randint(0, VOCAB, (2, 6))
    out = kd_loss(s, t, ids, alpha=0.3, temperature=2.0)
    ps = F.log_softmax(s[:, :-1] / 2, -1).double()
    pt = F.log_softmax(t[:, :-1] / 2, -1).double()
    kl = (pt.exp() * (pt - ps)).sum(-1).mean() * 4
    ntp = F.cross_entropy(s[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).double()
    torch.testing.assert_close(out["loss"].double(), 0.7 * ntp + 0.3 * kl, rtol=1e-5, atol=1e-6)
    assert float(kd_loss(t, t, ids)["kd"]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(LlmxError, match="teacher's tokenizer"):
        kd_loss(s[..., :10], t, ids)


def test_student_refusals():
    with pytest.raises(LlmxError, match="insert_layer=3 outside the model's 3 blocks"):
        CoCoMixLM(_llama(), n_concepts=16, insert_layer=3)
    with pytest.raises(LlmxError, match="attn_implementation='sdpa'"):
        CoCoMixLM(_llama(attn="eager"), n_concepts=16, insert_layer=1)
    with pytest.raises(LlmxError, match="mix='concat'"):
        CoCoMixLM(_llama(), n_concepts=16, insert_layer=1, mix="concat")
    with pytest.raises(LlmxError, match="k=33"):
        ConceptHead(D, 16, k=33)


class _Tok:
    eos_token_id = 0

    def get_vocab(self):
        return {f"t{i}": i for i in range(VOCAB)}


def test_label_cache_matches_online_labels_resumes_and_refuses_other_inputs(tmp_path):
    teacher, sae = _llama(), _sae()
    blocks = torch.randint(0, VOCAB, (7, 6))
    fp = labels_fingerprint(teacher, sae, _Tok(), blocks, 4, "attribution")
    done = []
    root = build_label_cache(tmp_path / "labels", teacher, sae, blocks, fp, batch_size=2, shard_blocks=3,
                             progress=lambda i, n: done.append(i))
    assert done == [3, 6, 7]
    cache = LabelCache(root, fp, 7, 6)
    idx = torch.tensor([5, 0, 6])
    torch.testing.assert_close(cache.lookup(blocks[idx]), concept_labels(teacher, sae, blocks[idx]))
    with pytest.raises(LlmxError, match="not in the concept-label cache"):
        cache.lookup(torch.randint(0, VOCAB, (1, 6)))
    # A killed build: the missing shard alone is recomputed.
    (root / "labels_00001.npy").unlink()
    done.clear()
    build_label_cache(root, teacher, sae, blocks, fp, batch_size=2, shard_blocks=3,
                      progress=lambda i, n: done.append(i))
    assert done == [6]
    torch.testing.assert_close(LabelCache(root, fp, 7, 6).lookup(blocks), concept_labels(teacher, sae, blocks))
    other_sae = labels_fingerprint(teacher, _sae(n=40), _Tok(), blocks, 4, "attribution")
    with pytest.raises(LlmxError, match="match this run's sae"):
        LabelCache(root, other_sae, 7, 6)
    other_teacher = labels_fingerprint(_llama(seed=3), sae, _Tok(), blocks, 4, "attribution")
    with pytest.raises(LlmxError, match="match this run's teacher"):
        build_label_cache(root, _llama(seed=3), sae, blocks, other_teacher)
    other_blocks = labels_fingerprint(teacher, sae, _Tok(), blocks.flip(0), 4, "attribution")
    with pytest.raises(LlmxError, match="match this run's blocks"):
        LabelCache(root, other_blocks, 7, 6)


def test_baseline_width_matches_cocomix_parameter_count():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = _llama()
    model = CoCoMixLM(lm, n_concepts=256, insert_layer=1)
    target = sum(p.numel() for p in model.parameters())
    assert target - sum(p.numel() for p in lm.parameters()) == concept_head_parameters(D, 256)
    cfg, n = matched_config(lm.config, target)
    assert sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) == n
    assert cfg.hidden_size > D and cfg.hidden_size % 8 == 0 and cfg.num_hidden_layers == 3
    # One more unit of MLP width changes the count by 3 x hidden x layers: the match is within half of that.
    assert abs(n - target) <= 3 * cfg.hidden_size * 3 / 2
    # A large vocabulary: one hidden step adds more than the concept head; the MLP takes up the difference.
    big = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    base = sum(p.numel() for p in LlamaForCausalLM(big).parameters())
    target = base + concept_head_parameters(128, 1024)
    cfg, n = matched_config(big, target)
    assert cfg.hidden_size == 128 and cfg.intermediate_size > 512 and abs(n - target) <= 3 * 128 * 4 / 2


def test_steering_raises_one_concept_and_changes_the_continuation():
    model = CoCoMixLM(_llama(), n_concepts=48, insert_layer=1).eval()
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        base_logits, base_concepts = model(ids)
        model.concept.steer = (7, 100.0)
        logits, concepts = model(ids)
        model.concept.steer = None
    torch.testing.assert_close(concepts[..., 7], base_concepts[..., 7] + 100.0)
    torch.testing.assert_close(concepts[..., :7], base_concepts[..., :7])
    assert not torch.allclose(logits, base_logits)  # concept 7 now enters every compression
    plain = greedy_generate(model, ids, 6)
    assert plain.shape == (1, 6) and torch.equal(plain, greedy_generate(model, ids, 6))
    assert model.concept.steer is None and steered(model, ids, 7, 100.0, 6).shape == (1, 6)
    assert model.concept.steer is None
