"""fastdistill.make_student on tiny Llama, Qwen2 and GPT-2 teachers built from configs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastdistill as fd  # noqa: E402


def teacher(kind, tie=False):
    torch.manual_seed(0)
    common = dict(vocab_size=50, num_hidden_layers=6, tie_word_embeddings=tie)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=32,
                                       **common)
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=48,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=32, **common)
        m = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_positions=32, vocab_size=50,
                                      n_layer=6, tie_word_embeddings=tie)
        m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial norm scales and biases
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def blocks(m):
    return m.transformer.h if hasattr(m, "transformer") else m.model.layers


KINDS = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_layers_copies_teacher_layers(kind):
    t = teacher(kind)
    s, lm = fd.make_student(t, num_layers=3)
    assert isinstance(lm, fd.LayerMap) and lm == fd.LayerMap.uniform(3, 6)
    assert lm.pairs == ((0, 1), (1, 3), (2, 5))
    assert type(s) is type(t) and s.config.num_hidden_layers == 3
    for i, j in lm.pairs:
        a, b = blocks(s)[i].state_dict(), blocks(t)[j].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(s.get_input_embeddings().weight, t.get_input_embeddings().weight)
    assert torch.equal(s.get_output_embeddings().weight, t.get_output_embeddings().weight)
    # the untouched teacher; the student trains on its own parameters
    assert t.config.num_hidden_layers == 6
    assert all(p.data_ptr() != q.data_ptr() for p in s.parameters() for q in t.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_all_layers_gives_the_teacher_function(kind):
    t = teacher(kind)
    s, lm = fd.make_student(t, num_layers=6)
    s.eval()
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(s(ids).logits, t(ids).logits)
    assert lm.pairs == tuple((i, i) for i in range(6))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [False, True])
def test_smaller_hidden_size_svd(kind, tie):
    """hidden 32 -> 16: the embeddings are E P with P the top right singular vectors of E
    (checked against torch.linalg.svd), weights reading the stream W P, norms
    diag(P^T diag(g) P); the student runs and can be distilled with the returned map."""
    t = teacher(kind, tie)
    s, lm = fd.make_student(t, num_layers=2, hidden_size=16)
    assert s.config.hidden_size == 16 and s.config.num_hidden_layers == 2
    assert lm.pairs == ((0, 2), (1, 5))
    E = t.get_input_embeddings().weight.detach().double()
    _, _, Vh = torch.linalg.svd(E, full_matrices=False)
    P = Vh[:16].t()
    Es = s.get_input_embeddings().weight.detach().double()
    # the same subspace: E P up to the sign of each column
    ref = E @ P
    signs = torch.sign((Es * ref).sum(0))
    assert torch.allclose(Es, ref * signs, atol=1e-5)
    Pm = P * signs
    if kind == "gpt2":
        w_t, w_s = t.transformer.h[2].mlp.c_fc.weight, s.transformer.h[0].mlp.c_fc.weight  # Conv1D
        assert torch.allclose(w_s.double(), Pm.t() @ w_t.double(), atol=1e-5)
        g_t, g_s = t.transformer.h[5].ln_2.weight, s.transformer.h[1].ln_2.weight
    else:
        w_t, w_s = t.model.layers[2].mlp.gate_proj.weight, s.model.layers[0].mlp.gate_proj.weight
        assert torch.allclose(w_s.double(), w_t.double() @ Pm, atol=1e-5)
        assert s.model.layers[0].self_attn.q_proj.weight.shape == (32, 16)  # heads kept
        g_t, g_s = t.model.layers[5].post_attention_layernorm.weight, \
            s.model.layers[1].post_attention_layernorm.weight
    assert torch.allclose(g_s.double(), (Pm * Pm).t() @ g_t.double(), atol=1e-5)
    if tie:
        assert s.get_output_embeddings().weight is s.get_input_embeddings().weight
    ids = torch.randint(0, 50, (2, 7))
    out = s(ids, output_hidden_states=True)
    assert torch.isfinite(out.logits).all() and len(out.hidden_states) == 3
    crit = fd.FeatureDistillLoss(lm, 16, 32)
    with torch.no_grad():
        t_hs = t(ids, output_hidden_states=True).hidden_states
    loss = crit(out.hidden_states, t_hs)
    loss.backward()
    assert torch.isfinite(loss)


def test_truncate_projection_and_explicit_layers():
    t = teacher("llama")
    s, lm = fd.make_student(t, num_layers=2, hidden_size=16, layers=[0, 4],
                            projection="truncate")
    assert lm.pairs == ((0, 0), (1, 4))
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight[:, :16])
    assert torch.equal(s.model.layers[1].self_attn.o_proj.weight,
                       t.model.layers[4].self_attn.o_proj.weight[:16])


def test_config_overrides():
    t = teacher("llama")
    s, _ = fd.make_student(t, num_layers=2, intermediate_size=24)
    assert s.config.intermediate_size == 24
    assert torch.equal(s.model.layers[1].mlp.down_proj.weight,
                       t.model.layers[5].mlp.down_proj.weight[:, :24])


def test_bad_arguments():
    t = teacher("llama")
    with pytest.raises(ValueError, match="num_layers"):
        fd.make_student(t, num_layers=7)
    with pytest.raises(TypeError, match="num_layers"):
        fd.make_student(t, num_layers=2.0)
    with pytest.raises(ValueError, match="hidden_size"):
        fd.make_student(t, num_layers=2, hidden_size=64)
    with pytest.raises(ValueError, match="projection"):
        fd.make_student(t, num_layers=2, hidden_size=16, projection="pca")
    with pytest.raises(ValueError, match="layers"):
        fd.make_student(t, num_layers=2, layers=[3, 1])
    with pytest.raises(ValueError, match="layers"):
        fd.make_student(t, num_layers=2, layers=[0, 1, 2])
    with pytest.raises(ValueError, match="config_overrides"):
        fd.make_student(t, num_layers=2, not_an_option=3)
    with pytest.raises(TypeError, match="teacher"):
        fd.make_student(torch.nn.Linear(3, 3), num_layers=1)
