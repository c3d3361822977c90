"""A hand-written training loop with Accelerate and fastdistill's fused loss.

`run_to_hidden` runs a causal LM to its last hidden state and hands back its lm_head's
(effective) weight and bias without computing the logits; the forward goes through the
Accelerate/DDP wrapper, so gradients synchronise as usual. The loss is
fd.linear_distill_loss on both models' hidden states and lm_heads. About 15 seconds on a CPU.

    python examples/accelerate_loop.py
    torchrun --nproc_per_node 2 examples/accelerate_loop.py       # DDP, two CPU processes
    accelerate launch --num_processes 2 examples/accelerate_loop.py   # on two GPUs
"""

import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import fastdistill as fd
from fastdistill.integrations.hf import run_to_hidden
from tiny_lm import eval_ce, markov_corpus, tiny_llama, train_lm


def main():
    t0 = time.time()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    data, val = markov_corpus(1024, 20, seed=0), markov_corpus(256, 20, seed=1)
    teacher = train_lm(tiny_llama(48, 4, seed=0), data, steps=120, batch=16)
    student = tiny_llama(24, 2, seed=1)  # from scratch this time
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    loader = DataLoader(data, batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    student, opt, loader = accelerator.prepare(student, opt, loader)
    teacher = teacher.to(accelerator.device).eval()

    step = 0
    for epoch in range(2):
        for ids in loader:
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
            h_s, w_s, b_s, _ = run_to_hidden(student, input_ids=ids)
            with torch.no_grad():
                h_t, w_t, b_t, _ = run_to_hidden(teacher, input_ids=ids)
            loss = fd.linear_distill_loss(h_s, w_s, h_t, w_t, targets, student_bias=b_s,
                                          teacher_bias=b_t, divergence="jsd", beta=0.5,
                                          temperature=1.0, hard_weight=0.2)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            if step % 20 == 0:
                accelerator.print(f"epoch {epoch} step {step:3d} loss {float(loss.detach()):.4f}")
            step += 1
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(student)
        print(f"student val CE {eval_ce(model, val):.3f} (teacher {eval_ce(teacher, val):.3f}) "
              f"| {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
