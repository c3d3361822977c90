"""fastdistill.integrations.trl against the installed TRL: the same losses and gradients as TRL's
own DistillationTrainer, GKDTrainer and GOLDTrainer, and the same parameters after training
(tiny Llama models and a word-level tokenizer built in code)."""

import copy
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fastdistill.integrations import trl as ftrl  # noqa: E402
from hf_models import V, batch_rows, collate, llama  # noqa: E402

COMMON = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
              learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
              max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True,
              save_strategy="no", seed=0, disable_tqdm=True, bf16=False)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, V)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", padding_side="left")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def models(seed=0):
    """A student and a sharper teacher (its lm_head scaled up so the divergence is large)."""
    s, t = llama(16, 2, seed=seed + 1), llama(24, 2, seed=seed + 2)
    with torch.no_grad():
        t.lm_head.weight.mul_(25.0)
        s.lm_head.weight.mul_(5.0)
    for m in (s, t):
        m.generation_config.eos_token_id = 1
    return s, t


def prompts_dataset(n=8):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        rows.append({"prompt": " ".join(f"w{int(i)}" for i in
                                        torch.randint(3, V, (k,), generator=g))})
    return datasets.Dataset.from_list(rows)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=rtol, atol=atol), \
            f"{k}: {(ga[k] - gb[k]).abs().max():.3g}"


def assert_params_close(a, b, atol=2e-6):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=atol, rtol=1e-5), f"{n}: {(p - q).abs().max():.3g}"


# ---- DistillationTrainer ------------------------------------------------------------------------


def distillation_trainer(cls, student, teacher, tmp_path, **kw):
    args = trl.DistillationConfig(output_dir=str(tmp_path), max_completion_length=6,
                                  **{**COMMON, **kw})
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=prompts_dataset(),
               processing_class=tokenizer())


def completion_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, V, (3, 5), generator=g)
    prompt_mask = torch.ones(3, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, V, (3, 6), generator=g)
    completion_mask = torch.ones(3, 6, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 2:] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask}


@pytest.mark.parametrize("beta,temperature,n_items", [(0.0, 1.0, None), (0.5, 2.0, 17),
                                                      (1.0, 0.7, None), (0.2, 1.0, 30)])
def test_distillation_loss_matches_trl(tmp_path, beta, temperature, n_items):
    s, t = models()
    ours = distillation_trainer(ftrl.DistillationTrainer, copy.deepcopy(s), t, tmp_path,
                                beta=beta, temperature=temperature)
    theirs = distillation_trainer(trl.DistillationTrainer, copy.deepcopy(s), t, tmp_path,
                                  beta=beta, temperature=temperature)
    batch = completion_batch()
    n = torch.tensor(float(n_items)) if n_items is not None else None
    out = []
    for tr in (ours, theirs):
        tr.model.train()
        loss, ent, nv = tr._compute_loss(tr.model, batch, n)
        loss.backward()
        out.append((loss.detach(), ent, nv))
    (l1, e1, n1), (l2, e2, n2) = out
    assert float(l2) > 1e-2
    assert float(l1) == pytest.approx(float(l2), rel=2e-5)
    assert float(e1) == pytest.approx(float(e2), rel=2e-5)
    assert int(n1) == int(n2)
    assert_grads_close(ours.model, theirs.model)


def test_distillation_logit_scale_and_softcap_match_trl(tmp_path):
    """Logit scales and softcaps declared in the model configs (as Cohere's logit_scale and
    Gemma's final_logit_softcapping are), applied by both trainers."""
    s, t = models(seed=7)
    s.config.logit_scale = 0.6
    t.config.logit_scale = 1.4
    t.config.final_logit_softcapping = 4.0
    ours = distillation_trainer(ftrl.DistillationTrainer, copy.deepcopy(s), t, tmp_path,
                                beta=0.4, temperature=1.3)
    theirs = distillation_trainer(trl.DistillationTrainer, copy.deepcopy(s), t, tmp_path,
                                  beta=0.4, temperature=1.3)
    batch = completion_batch(seed=1)
    vals = []
    for tr in (ours, theirs):
        tr.model.train()
        loss, ent, _ = tr._compute_loss(tr.model, batch, None)
        loss.backward()
        vals.append((float(loss.detach()), float(ent)))
    assert vals[1][0] > 1e-2
    assert vals[0][0] == pytest.approx(vals[1][0], rel=2e-5)
    assert vals[0][1] == pytest.approx(vals[1][1], rel=2e-5)
    assert_grads_close(ours.model, theirs.model)


def test_distillation_training_matches_trl(tmp_path):
    """Two steps with on-policy generation (same seed, so the same sampled completions): the
    same parameters and logged losses as TRL's trainer."""
    s, t = models(seed=3)
    a = distillation_trainer(ftrl.DistillationTrainer, copy.deepcopy(s), t, tmp_path,
                             beta=0.5, temperature=1.5)
    a.train()
    b = distillation_trainer(trl.DistillationTrainer, copy.deepcopy(s), t, tmp_path,
                             beta=0.5, temperature=1.5)
    b.train()
    la = [h["loss"] for h in a.state.log_history if "loss" in h]
    lb = [h["loss"] for h in b.state.log_history if "loss" in h]
    assert la == pytest.approx(lb, rel=2e-5)
    assert_params_close(a.model, b.model)


# ---- GKD and GOLD -------------------------------------------------------------------------------


def kd_rows(n=8, seed=0):
    rows = batch_rows(n, 9, seed=seed, prompt=3)
    for r in rows:
        r["prompts"] = r["input_ids"][:3]
        r["prompt_attention_mask"] = r["attention_mask"][:3]
    return rows


def kd_trainer(kind, cls, student, teacher, tmp_path, **kw):
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in kd_rows()])

    def collator(examples):
        return {k: torch.tensor([e[k] for e in examples]) for k in examples[0]}

    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig
        args = GKDConfig(output_dir=str(tmp_path), lmbda=0.0, seq_kd=False, max_new_tokens=4,
                         **{**COMMON, **kw})
    else:
        from trl.experimental.gold import GOLDConfig
        args = GOLDConfig(output_dir=str(tmp_path), lmbda=0.0, seq_kd=False,
                          max_completion_length=4, use_uld_loss=False,
                          remove_unused_columns=False, **{**COMMON, **kw})
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=ds,
               data_collator=collator, processing_class=tokenizer())


KD_CLASSES = {"gkd": lambda: (ftrl.GKDTrainer, __import__("trl.experimental.gkd",
                                                          fromlist=["GKDTrainer"]).GKDTrainer),
              "gold": lambda: (ftrl.GOLDTrainer, __import__("trl.experimental.gold",
                                                            fromlist=["GOLDTrainer"]).GOLDTrainer)}


@pytest.mark.parametrize("kind", ["gkd", "gold"])
@pytest.mark.parametrize("beta,n_items", [(0.5, None), (0.0, 23), (1.0, None), (0.3, 40)])
def test_kd_loss_matches_trl(tmp_path, kind, beta, n_items):
    ours_cls, theirs_cls = KD_CLASSES[kind]()
    s, t = models(seed=4)
    kw = dict(beta=beta, temperature=1.7)
    ours = kd_trainer(kind, ours_cls, copy.deepcopy(s), t, tmp_path, **kw)
    theirs = kd_trainer(kind, theirs_cls, copy.deepcopy(s), t, tmp_path, **kw)
    batch = collate(kd_rows(3, seed=5))
    n = torch.tensor(float(n_items)) if n_items is not None else None
    losses = []
    for tr in (ours, theirs):
        tr.model.train()
        loss = tr.compute_loss(tr.model, dict(batch), num_items_in_batch=n)
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[1] > 1e-2
    assert losses[0] == pytest.approx(losses[1], rel=2e-5)
    assert_grads_close(ours.model, theirs.model)


@pytest.mark.parametrize("kind", ["gkd", "gold"])
def test_kd_training_matches_trl(tmp_path, kind):
    ours_cls, theirs_cls = KD_CLASSES[kind]()
    s, t = models(seed=6)
    a = kd_trainer(kind, ours_cls, copy.deepcopy(s), t, tmp_path, beta=0.5)
    a.train()
    b = kd_trainer(kind, theirs_cls, copy.deepcopy(s), t, tmp_path, beta=0.5)
    b.train()
    la = [h["loss"] for h in a.state.log_history if "loss" in h]
    lb = [h["loss"] for h in b.state.log_history if "loss" in h]
    assert la == pytest.approx(lb, rel=2e-5)
    assert_params_close(a.model, b.model)


def test_missing_trl_gives_a_clear_error():
    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import fastdistill.integrations.trl\nexcept ImportError as e:\n"
            "    assert 'pip install trl' in str(e), e; print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
