"""Run by test_integrations_hf.py: DistillationTrainer for two steps, under torchrun (DDP with
gloo on CPU, one micro-batch per process) or in one process accumulating the same micro-batches.
Writes the logged losses and the final parameters to argv[1]."""

import os
import sys

import torch
from transformers import TrainingArguments

from fastdistill.config import DistillConfig
from fastdistill.integrations.hf import DistillationTrainer
from hf_models import batch_rows, llama


def main(out, accumulation):
    torch.set_num_threads(1)
    student, teacher = llama(16, 2, seed=1), llama(24, 2, seed=2)
    rows = batch_rows(8, 8, seed=3, prompt=1)
    args = TrainingArguments(output_dir="/tmp/fastdistill-ddp-test", per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, max_steps=2,
                             learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                             weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no",
                             train_sampling_strategy="sequential", disable_tqdm=True, seed=0,
                             ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                             distill_config=DistillConfig(temperature=2.0, hard_weight=0.3))
    tr.train()
    if tr.accelerator.is_main_process:
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        params = {n: p.detach().clone() for n, p in student.named_parameters()}
        torch.save({"losses": losses, "params": params}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
