"""llmx.concept.sae: the TopK SAE against dense float64 formulas, training on data with a known sparse dictionary,
AuxK and dead latents, the unit-norm decoder, save/load, OpenAI's layout, and the teacher's block output."""

import pytest
import torch

from llmx.concept.sae import (SAEConfig, TopKSAE, block_output, evaluate_sae, from_openai_state_dict, init_from_data,
                              load_sae, save_sae, train_step)
from llmx.utils import LlmxError


def _sae(d=16, n=64, k=4, **kw):
    torch.manual_seed(0)
    return TopKSAE(SAEConfig(d_model=d, n_latents=n, k=k, **kw))


def _reference(sae, x):
    """OpenAI's formulas, dense, float64: LN with the unbiased std, TopK then ReLU, dense decoder matmul."""
    w_enc, w_dec = sae.encoder.weight.double(), sae.decoder.weight.double()
    b_pre, b_lat = sae.pre_bias.double(), sae.latent_bias.double()
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + sae.cfg.eps)
    pre = (xn - b_pre) @ w_enc.T + b_lat
    top = pre.topk(sae.cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    return z, ((z @ w_dec.T + b_pre) * (std + sae.cfg.eps) + mu)


def test_forward_matches_dense_float64_reference():
    sae = _sae().double()
    with torch.no_grad():
        sae.pre_bias.normal_()
        sae.latent_bias.normal_(std=0.1)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 4 + 1
    z_ref, recon_ref = _reference(sae, x)
    idx, val = sae.encode(x)
    torch.testing.assert_close(sae.dense(idx, val), z_ref)
    torch.testing.assert_close(sae(x), recon_ref)
    assert int((sae.dense(idx, val) != 0).sum(-1).max()) <= sae.cfg.k


def test_sparse_decode_gradients_match_dense():
    sae = _sae().double()
    x = torch.randn(20, 16, dtype=torch.float64)
    sae(x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in (sae.encoder.weight, sae.decoder.weight, sae.pre_bias)]
    sae.zero_grad()
    _reference(sae, x)[1].pow(2).sum().backward()
    for g, p in zip(grads, (sae.encoder.weight, sae.decoder.weight, sae.pre_bias)):
        torch.testing.assert_close(g, p.grad)


def _dictionary_data(n=4096, d=16, n_true=48, active=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(n_true, d, generator=g)
    dic /= dic.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_true, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    x = torch.einsum("na,nad->nd", coef, dic[idx]) + 0.01 * torch.randn(n, d, generator=g)
    return x * 3 + 2, dic


def test_training_learns_a_sparse_dictionary_and_keeps_unit_decoder():
    x, dic = _dictionary_data()
    sae = _sae(n=96, k=3, dead_tokens=4096, normalize=False)  # the data is exactly sparse in the raw space
    init_from_data(sae, x[:1024])
    before = evaluate_sae(sae, x[-512:].split(128))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(400):
        train_step(sae, opt, x[torch.randint(0, 3584, (256,), generator=torch.Generator().manual_seed(step))])
    after = evaluate_sae(sae, x[-512:].split(128))
    assert before["nmse"] > 0.5 and after["nmse"] < 0.25, (before, after)
    assert after["explained_variance"] > 0.75 and after["l0"] <= 3
    torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(96), atol=1e-5, rtol=0)
    # Most true directions have a decoder column close to them (the dictionary was learned, not just fitted).
    cos = (dic @ sae.decoder.weight.detach()).max(dim=1).values
    assert float((cos > 0.8).float().mean()) > 0.85, cos


def test_auxk_loss_only_with_dead_latents_and_only_dead_latents_get_its_gradient():
    sae = _sae(n=64, k=4, aux_k=8, dead_tokens=100)
    x = torch.randn(64, 16)
    out = sae.loss(x)
    assert float(out["aux"]) == 0.0 and float(out["dead_fraction"]) == 0.0
    dead = torch.arange(32, 64)
    sae.tokens_since_fired[dead] = 1000

    def encoder_grad(aux_k):
        sae.cfg.aux_k = aux_k
        sae.zero_grad()
        out = sae.loss(x)
        out["loss"].backward()
        return out, sae.encoder.weight.grad.clone()

    out, with_aux = encoder_grad(8)
    assert float(out["aux"]) > 0 and float(out["dead_fraction"]) == 0.5
    _, without = encoder_grad(0)
    diff = (with_aux - without).abs().sum(1)
    assert float(diff[:32].max()) == 0.0 and float(diff[dead].sum()) > 0


def test_dead_counter_counts_tokens_and_resets_on_firing():
    sae = _sae(n=64, k=4, dead_tokens=10)
    with torch.no_grad():
        sae.latent_bias[:4] = 100.0  # latents 0-3 always fire
    sae.train()
    sae.loss(torch.randn(7, 16))
    sae.loss(torch.randn(5, 16))
    assert sae.tokens_since_fired[:4].tolist() == [0, 0, 0, 0]
    assert set(sae.tokens_since_fired[4:].tolist()) == {12}
    assert float(sae.loss(torch.randn(2, 16))["dead_fraction"]) == 60 / 64
    sae.eval()
    sae.loss(torch.randn(5, 16))  # evaluation does not advance the counter
    assert set(sae.tokens_since_fired[4:].tolist()) == {14}


def test_save_load_roundtrip_and_provenance_checks(tmp_path):
    sae = _sae(teacher="smollm2", layer=3)
    sae.tokens_since_fired[5] = 7
    save_sae(sae, tmp_path / "sae", extra={"tokens": 123})
    back = load_sae(tmp_path / "sae", expect={"teacher": "smollm2", "layer": 3, "d_model": 16})
    x = torch.randn(4, 16)
    torch.testing.assert_close(back(x), sae(x))
    assert int(back.tokens_since_fired[5]) == 7
    with pytest.raises(LlmxError, match="layer=3, expected 5"):
        load_sae(tmp_path / "sae", expect={"layer": 5})
    with pytest.raises(LlmxError, match="config.json missing"):
        load_sae(tmp_path)


def test_openai_layout_converts():
    sae = _sae(n=32, k=5)
    with torch.no_grad():
        sae.pre_bias.normal_()
    sd = {k: v.clone() for k, v in sae.state_dict().items() if k != "tokens_since_fired"}
    sd.update({"stats_last_nonzero": torch.zeros(32, dtype=torch.long), "activation": "TopK",
               "activation_state_dict": {"k": 5, "postact_fn": "ReLU"}})
    conv = from_openai_state_dict(sd, teacher="gpt2", layer=5)
    assert (conv.cfg.k, conv.cfg.normalize, conv.cfg.layer) == (5, True, 5)
    x = torch.randn(3, 16)
    torch.testing.assert_close(conv(x), sae(x))
    with pytest.raises(LlmxError, match="TopK"):
        from_openai_state_dict({**sd, "activation": "ReLU"}, teacher="gpt2", layer=5)


def test_config_refusals():
    with pytest.raises(LlmxError, match="k=65"):
        SAEConfig(d_model=8, n_latents=64, k=65)
    with pytest.raises(LlmxError, match="unknown config keys"):
        SAEConfig.from_dict({"d_model": 8, "n_latents": 16, "width": 3})


def test_block_output_is_the_residual_after_the_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        later = []
        handle = model.model.layers[2].register_forward_hook(lambda *a: later.append(1))
        h = block_output(model, 1, ids)
        handle.remove()
    torch.testing.assert_close(h, ref[2])  # hidden_states[0] is the embedding output
    assert not later, "the forward pass should stop after the requested block"
    with pytest.raises(LlmxError, match="layer 3 outside the model's 3 blocks"):
        block_output(model, 3, ids)


def test_block_output_reads_gpt2_blocks_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=3, n_head=4, n_positions=16)).eval()
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(block_output(model, 0, ids), ref[1])


def test_convert_script_publishes_an_openai_file(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    sae = _sae(n=32, k=5)
    sd = {k: v.clone() for k, v in sae.state_dict().items() if k != "tokens_since_fired"}
    sd.update({"activation": "TopK", "activation_state_dict": {"k": 5, "postact_fn": "ReLU"}})
    torch.save(sd, tmp_path / "5.pt")
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_openai_sae.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "5.pt"), "--teacher", "gpt2", "--layer", "5",
                    "--name", "x", "--out", str(tmp_path / "out")], check=True, capture_output=True)
    back = load_sae(tmp_path / "out", expect={"teacher": "gpt2", "layer": 5, "k": 5})
    x = torch.randn(3, 16)
    torch.testing.assert_close(back(x), sae(x))
