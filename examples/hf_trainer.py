"""fastdistill.integrations.hf.DistillationTrainer: distillation with the Hugging Face Trainer.

A teacher learns a synthetic language; a student made from it with fd.make_student is trained
by transformers.Trainer with fastdistill's loss: both models run to their last hidden states
(no [tokens, vocab] logits), the loss is linear_distill_loss on both lm_heads plus feature
distillation over the student's layer map; padding, gradient accumulation and the per-part
logs are the trainer's. About 20 seconds on a CPU.

    python examples/hf_trainer.py
    torchrun --nproc_per_node 2 examples/hf_trainer.py       # DDP, two CPU processes
    accelerate launch --num_processes 2 examples/hf_trainer.py   # on two GPUs
"""

import tempfile
import time

import torch
from transformers import TrainingArguments

import fastdistill as fd
from fastdistill.config import DistillConfig
from fastdistill.integrations.hf import DistillationTrainer
from tiny_lm import PAD, eval_ce, markov_corpus, params, tiny_llama, train_lm


def padded_rows(data, seed=0):
    """Rows of random lengths, right-padded: labels are -100 on the padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for ids in data:
        n = int(torch.randint(len(ids) // 2, len(ids) + 1, (1,), generator=g))
        mask = (torch.arange(len(ids)) < n).long()
        ids = ids.masked_fill(mask == 0, PAD)
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def main():
    t0 = time.time()
    torch.set_num_threads(1)
    data, val = markov_corpus(1024, 20, seed=0), markov_corpus(256, 20, seed=1)
    teacher = train_lm(tiny_llama(48, 4, seed=0), data, steps=120, batch=16)
    student, layer_map = fd.make_student(teacher, num_layers=2, hidden_size=24)
    print(f"teacher {params(teacher)} val CE {eval_ce(teacher, val):.3f} | student "
          f"{params(student)} val CE {eval_ce(student, val):.3f} before distillation")

    config = DistillConfig(divergence="forward_kl", temperature=2.0, t2_scale=True,
                           hard_weight=0.5, soft_weight=0.5,
                           layer_map=layer_map, feature_kind="mse", feature_weight=0.1)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, max_steps=60, learning_rate=3e-3,
                             logging_steps=20, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  distill_config=config, train_dataset=padded_rows(data))
    trainer.train()
    if trainer.accelerator.is_main_process:
        for h in trainer.state.log_history:
            if "soft_loss" in h:
                print(f"step {h['step']:3d}  loss {h['loss']:.4f} = soft {h['soft_loss']:.4f} "
                      f"+ hard {h['hard_loss']:.4f} + feature {h['feature_loss']:.4f}")
        print(f"student val CE {eval_ce(student, val):.3f} after distillation "
              f"(teacher {eval_ce(teacher, val):.3f}) | {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
