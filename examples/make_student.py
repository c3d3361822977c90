"""fd.make_student: a smaller student initialised from its teacher, then distilled.

A 4-layer, width-48 Llama teacher learns a synthetic language; make_student builds a 2-layer,
width-24 student from it (layers copied as DistilBERT did, the width reduced by a truncated SVD
of the embeddings) and the returned LayerMap drives feature distillation next to the logit
loss, in a plain PyTorch loop. About 30 seconds on a CPU.

    python examples/make_student.py
"""

import time

import torch

import fastdistill as fd
from tiny_lm import eval_ce, markov_corpus, params, tiny_llama, train_lm


def main():
    t0 = time.time()
    torch.set_num_threads(1)
    data, val = markov_corpus(1024, 20, seed=0), markov_corpus(256, 20, seed=1)
    teacher = train_lm(tiny_llama(48, 4, seed=0), data, steps=120, batch=16)
    print(f"teacher: {params(teacher)} params, val CE {eval_ce(teacher, val):.3f}")

    student, layer_map = fd.make_student(teacher, num_layers=2, hidden_size=24)
    print(f"student: {params(student)} params, layers from the teacher's {layer_map.pairs}, "
          f"val CE at init {eval_ce(student, val):.3f}")
    scratch = tiny_llama(24, 2, seed=1)
    print(f"a randomly initialised student of the same shape: val CE {eval_ce(scratch, val):.3f}")

    feature = fd.FeatureDistillLoss(layer_map, student_dims=24, teacher_dims=48, kind="mse")
    opt = torch.optim.AdamW(list(student.parameters()) + list(feature.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        ids = data[torch.randint(0, len(data), (16,), generator=g)]
        s_out = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        with torch.no_grad():
            t_out = teacher(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        # logits straight from the last hidden states and the lm_heads (never [tokens, vocab])
        kd = fd.linear_distill_loss(s_out.hidden_states[-1], student.lm_head.weight,
                                    t_out.hidden_states[-1], teacher.lm_head.weight, targets,
                                    temperature=2.0, t2_scale=True, hard_weight=0.5,
                                    soft_weight=0.5)
        feat = feature(s_out.hidden_states, t_out.hidden_states)
        loss = kd + 0.1 * feat
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == 59:
            print(f"step {step:3d}  distill {float(kd.detach()):.4f}  feature "
                  f"{float(feat.detach()):.4f}")
    print(f"student after distillation: val CE {eval_ce(student, val):.3f} "
          f"(teacher {eval_ce(teacher, val):.3f}) | {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
