"""fastdistill.integrations.hf.DistillationTrainer against a plain-PyTorch distillation loop
(full logits, fastdistill's float64 reference), on tiny Llama models built from configs."""

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from fastdistill.config import DistillConfig  # noqa: E402
from fastdistill.integrations.hf import DistillationTrainer  # noqa: E402
from fastdistill.layers import LayerMap  # noqa: E402
from fastdistill.reference import reference_feature_loss  # noqa: E402
from hf_models import (batch_rows, collate, llama, reference_loss,  # noqa: E402
                       reference_train)

HERE = os.path.dirname(os.path.abspath(__file__))


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_steps=2, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                warmup_steps=0, logging_steps=1, report_to=[], use_cpu=True,
                save_strategy="no", train_sampling_strategy="sequential",
                dataloader_num_workers=0, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


OPTIONS = dict(divergence="jsd", beta=0.3, temperature=2.0, t2_scale=True, hard_weight=0.4,
               soft_weight=0.6)


def params_close(a, b, atol=2e-6):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p.float(), q.float(), atol=atol, rtol=1e-5), \
            f"{n}: max diff {(p.float() - q.float()).abs().max():.3g}"


@pytest.mark.parametrize("options", [OPTIONS, dict(divergence="forward_kl", temperature=1.0)])
def test_training_matches_reference_loop(tmp_path, options):
    """Two SGD steps of two accumulated micro-batches with padding: the same parameters as the
    hand-written loop, and the same logged losses."""
    student, teacher = llama(16, 2, seed=1), llama(24, 3, seed=2)
    ref_student = copy.deepcopy(student)
    rows = batch_rows(8, 10, seed=3, prompt=2)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=targs(tmp_path),
                             train_dataset=rows, distill_config=DistillConfig(**options))
    tr.train()
    ref_losses = reference_train(ref_student, teacher, rows, batch_size=2, accumulation=2,
                                 steps=2, lr=0.5, **options)
    params_close(student, ref_student)
    logged = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert logged == pytest.approx(ref_losses, rel=1e-5)
    parts = [h for h in tr.state.log_history if "soft_loss" in h]
    for h in parts:
        total = h["soft_loss"] + h["hard_loss"]
        assert total == pytest.approx(h["loss"], rel=1e-4, abs=1e-5)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _compute(tr, batch, n_items=None):
    tr.model.train()
    loss = tr.compute_loss(tr.model, dict(batch), num_items_in_batch=n_items)
    loss.backward()
    return loss.detach()


def _check_step(tmp_path, student, teacher, batch, options, atol=1e-6, ref_student=None,
                **trainer_kw):
    ref_student = ref_student if ref_student is not None else copy.deepcopy(student)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=targs(tmp_path),
                             distill_config=DistillConfig(**options), **trainer_kw)
    n = int((batch["labels"][:, 1:] != -100).sum()) + 3  # as if 3 more tokens sat elsewhere
    loss = _compute(tr, batch, torch.tensor(n))
    ref = reference_loss(ref_student, teacher, batch, num_items_in_batch=n, **options)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-7)
    g, rg = _grads(student), _grads(ref_student)
    assert g.keys() == rg.keys()
    for k in g:
        assert torch.allclose(g[k], rg[k], atol=atol, rtol=1e-4), \
            f"{k}: max diff {(g[k] - rg[k]).abs().max():.3g}"
    return tr


def test_evaluate(tmp_path):
    """evaluate(): the batch-size-weighted mean of the per-batch losses."""
    student, teacher = llama(16, 2, seed=32), llama(24, 2, seed=33)
    rows = batch_rows(6, 8, seed=34)
    tr = DistillationTrainer(model=student, teacher_model=teacher,
                             args=targs(tmp_path, per_device_eval_batch_size=2),
                             eval_dataset=rows, distill_config=DistillConfig(**OPTIONS))
    got = tr.evaluate()["eval_loss"]
    with torch.no_grad():
        ref = [float(reference_loss(student, teacher, collate(rows[i:i + 2]), **OPTIONS))
               for i in range(0, 6, 2)]
    assert got == pytest.approx(sum(ref) / 3, rel=1e-5)


def test_tied_embeddings_left_padding_and_teacher_dtype(tmp_path):
    """Tied input/output embeddings get the gradient of both uses; a bfloat16 teacher (kept
    frozen, in eval mode) next to a float32 student; left padding."""
    student = llama(16, 2, tie=True, seed=4)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    teacher = llama(32, 2, seed=5, dtype=torch.bfloat16)
    teacher.train()
    batch = collate(batch_rows(3, 9, seed=6, pad_side="left"))
    tr = _check_step(tmp_path, student, teacher, batch, OPTIONS)
    assert not tr.teacher_model.training
    assert all(not p.requires_grad for p in tr.teacher_model.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_gradient_checkpointing(tmp_path):
    student, teacher = llama(16, 3, seed=7), llama(24, 2, seed=8)
    ref = copy.deepcopy(student)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = collate(batch_rows(2, 8, seed=9))
    _check_step(tmp_path, student, teacher, batch, OPTIONS, ref_student=ref)


def test_without_labels_uses_next_tokens_and_padding(tmp_path):
    student, teacher = llama(16, 2, seed=10), llama(16, 2, seed=11)
    batch = collate(batch_rows(3, 8, seed=12))
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=targs(tmp_path),
                             distill_config=DistillConfig(hard_weight=0.5))
    ref_student = copy.deepcopy(student)
    loss = _compute(tr, {k: v for k, v in batch.items() if k != "labels"})
    ref = reference_loss(ref_student, teacher, batch, hard_weight=0.5)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_all_labels_ignored_gives_zero(tmp_path):
    student, teacher = llama(16, 2, seed=38), llama(16, 2, seed=39)
    batch = collate(batch_rows(2, 8, seed=40))
    batch["labels"][:] = -100
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=targs(tmp_path),
                             distill_config=DistillConfig(hard_weight=0.5))
    loss = _compute(tr, batch, torch.tensor(0))
    assert float(loss) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in student.parameters()
               if p.grad is not None)


def test_collator_shift_labels_are_used_as_given(tmp_path):
    """A collator's already shifted ``shift_labels`` (padding-free collators) replace labels."""
    student, teacher = llama(16, 2, seed=41), llama(16, 2, seed=42)
    batch = collate(batch_rows(2, 8, seed=43))
    shifted = torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], 1)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=targs(tmp_path),
                             distill_config=DistillConfig(hard_weight=0.5, temperature=2.0))
    ref_student = copy.deepcopy(student)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "shift_labels": shifted}
    loss = _compute(tr, inputs)
    ref = reference_loss(ref_student, teacher, batch, hard_weight=0.5, temperature=2.0)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_lora_student_with_lora_lm_head(tmp_path):
    """LoRA on attention and on the lm_head: the loss sees W + s B A, and the LoRA parameters
    (B initialised non-zero here so that the head's adapter matters) get the gradients of the
    plain PEFT forward."""
    peft = pytest.importorskip("peft")
    base, teacher = llama(16, 2, seed=13), llama(24, 2, seed=14)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj", "lm_head"])
    student = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ref_student = copy.deepcopy(student)
    batch = collate(batch_rows(3, 8, seed=15))
    _check_step(tmp_path, student, teacher, batch, OPTIONS, ref_student=ref_student)
    head_grads = [n for n, p in student.named_parameters()
                  if "lm_head" in n and "lora" in n and p.grad is not None]
    assert len(head_grads) == 2


def test_lora_lm_head_dropout_is_exact(tmp_path):
    """With lora_dropout > 0 the adapter sees one dropout mask of the head's input, as in PEFT's
    forward: the same random stream gives the same loss and gradients."""
    peft = pytest.importorskip("peft")
    base, teacher = llama(16, 2, seed=35), llama(16, 2, seed=36)
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.5,
                                                        target_modules=["lm_head"]))
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ref_student = copy.deepcopy(student)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=targs(tmp_path),
                             distill_config=DistillConfig(**OPTIONS))
    batch = collate(batch_rows(3, 8, seed=37))
    torch.manual_seed(7)
    loss = _compute(tr, batch)
    ref_student.train()
    torch.manual_seed(7)
    ref = reference_loss(ref_student, teacher, batch, **OPTIONS)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    g, rg = _grads(student), _grads(ref_student)
    for k in g:
        assert torch.allclose(g[k], rg[k], atol=1e-6, rtol=1e-4), k


def test_lora_modules_to_save_lm_head(tmp_path):
    peft = pytest.importorskip("peft")
    base, teacher = llama(16, 2, seed=16), llama(16, 2, seed=17)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    student = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # the trained copy differs from the original head
        student.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    batch = collate(batch_rows(2, 8, seed=18))
    _check_step(tmp_path, student, teacher, batch, dict(temperature=1.5, hard_weight=0.2))


def test_feature_distillation(tmp_path):
    """feature_weight * FeatureDistillLoss over a uniform layer map (learned projections from
    width 16 to 24), added to the logit loss; its projections are trained."""
    student, teacher = llama(16, 2, seed=19), llama(24, 4, seed=20)
    lm = LayerMap.uniform(2, 4)
    options = dict(temperature=2.0, hard_weight=0.3)
    cfg = DistillConfig(layer_map=lm, feature_weight=0.7, feature_kind="cosine", **options)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=targs(tmp_path),
                             distill_config=cfg)
    batch = collate(batch_rows(2, 8, seed=21))
    ref_student = copy.deepcopy(student)
    loss = _compute(tr, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = reference_loss(ref_student, teacher, batch, **options)
    s_hs = ref_student(**inputs, output_hidden_states=True).hidden_states
    with torch.no_grad():
        t_hs = teacher(**inputs, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    feats = [reference_feature_loss(s_hs[s + 1], t_hs[t + 1], "cosine", mask,
                                    tr.feature_loss.projection(i))
             for i, (s, t) in enumerate(lm.pairs)]
    ref = ref + 0.7 * sum(feats) / len(feats)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    # the projections are in the optimizer and move
    tr.train_dataset = batch_rows(8, 8, seed=22)
    before = [p.detach().clone() for p in tr.feature_loss.parameters()]
    tr.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, tr.feature_loss.parameters()))
    assert any("feature_loss" in h for h in tr.state.log_history)
    # saved beside the model, and loaded back when resuming from a checkpoint
    out = tmp_path / "saved"
    tr.save_model(str(out))
    saved = torch.load(out / "fastdistill_feature_loss.pt")
    state = tr.feature_loss.state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in state if torch.is_tensor(state[k]))
    with torch.no_grad():
        for p in tr.feature_loss.parameters():
            p.zero_()
    tr._load_from_checkpoint(str(out))
    assert all(torch.equal(p, saved[k]) for k, p in tr.feature_loss.state_dict().items()
               if torch.is_tensor(p))


def test_bf16_autocast(tmp_path):
    """bf16 mixed precision: the lm_head operands rounded as autocast rounds them, float32
    logits in the loss; close to the float32 loop within bf16 rounding."""
    student, teacher = llama(16, 2, seed=23), llama(24, 2, seed=24)
    rows = batch_rows(8, 8, seed=25)
    ref_student = copy.deepcopy(student)
    tr = DistillationTrainer(model=student, teacher_model=teacher,
                             args=targs(tmp_path, bf16=True), train_dataset=rows,
                             distill_config=DistillConfig(**OPTIONS))
    tr.train()
    ref = reference_train(ref_student, teacher, rows, batch_size=2, accumulation=2, steps=2,
                          lr=0.5, **OPTIONS)
    logged = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert logged == pytest.approx(ref, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_bad_arguments(tmp_path):
    s, t = llama(16, 2), llama(16, 2)
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=s, args=targs(tmp_path))
    with pytest.raises(TypeError, match="distill_config"):
        DistillationTrainer(model=s, teacher_model=t, args=targs(tmp_path),
                            distill_config={"temperature": 2.0})
    with pytest.raises(ValueError, match="reduction"):
        DistillationTrainer(model=s, teacher_model=t, args=targs(tmp_path),
                            distill_config=DistillConfig(reduction="sum"))
    with pytest.raises(ValueError, match="vocab_size"):
        DistillationTrainer(model=s, teacher_model=llama(16, 2, vocab=56), args=targs(tmp_path))
    with pytest.raises(ValueError, match="ignore_index"):
        DistillationTrainer(model=s, teacher_model=t, args=targs(tmp_path),
                            distill_config=DistillConfig(ignore_index=-1))
    with pytest.raises(ValueError, match="compute_loss_func"):
        DistillationTrainer(model=s, teacher_model=t, args=targs(tmp_path),
                            compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="layer_map"):
        DistillationTrainer(model=s, teacher_model=t, args=targs(tmp_path),
                            distill_config=DistillConfig(layer_map=LayerMap.uniform(3, 4),
                                                         feature_weight=1.0))


def test_logit_scales(tmp_path):
    """distill_config's logit scales multiply the logits before everything else."""
    student, teacher = llama(16, 2, seed=29), llama(24, 2, seed=30)
    batch = collate(batch_rows(3, 8, seed=31))
    options = dict(student_logit_scale=0.7, teacher_logit_scale=1.6, temperature=1.5,
                   hard_weight=0.3)
    _check_step(tmp_path, student, teacher, batch, options)


def test_padded_teacher_vocabulary(tmp_path):
    """A teacher whose lm_head has padding rows: distill_config.vocab_size selects the real
    vocabulary."""
    student, teacher = llama(16, 2, seed=26), llama(16, 2, vocab=56, seed=27)
    batch = collate(batch_rows(2, 8, seed=28))
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=targs(tmp_path),
                             distill_config=DistillConfig(vocab_size=48, temperature=2.0))
    ref_student = copy.deepcopy(student)
    loss = _compute(tr, batch)
    ref = reference_loss(ref_student, teacher, batch, vocab_size=48, temperature=2.0)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_ddp_two_processes_match_one(tmp_path):
    """Two gloo CPU processes (torchrun, one micro-batch each) give the parameters of one process
    accumulating the same two micro-batches."""
    script = os.path.join(HERE, "ddp_hf_trainer.py")
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    out2 = tmp_path / "ddp2.pt"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), script, str(out2), "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out1 = tmp_path / "single.pt"
    r = subprocess.run([sys.executable, script, str(out1), "2"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = torch.load(out2), torch.load(out1)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    for k in b["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], atol=1e-6, rtol=1e-5), k


def test_missing_transformers_gives_a_clear_error():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import fastdistill.integrations.hf\nexcept ImportError as e:\n"
            "    assert 'pip install transformers' in str(e), e; print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_import_fastdistill_imports_no_trainer_library():
    code = ("import sys, fastdistill as fd; bad = [m for m in ('transformers', 'trl', 'peft', "
            "'accelerate') if m in sys.modules]; print(bad); assert not bad; "
            "import fastdistill.integrations; assert 'transformers' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
