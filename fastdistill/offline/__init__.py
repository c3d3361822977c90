"""Offline and served teachers: top-k teacher distributions extracted once, stored, and read
back as ``teacher_topk=(indices, logprobs)`` for ``fastdistill.distill_loss`` /
``linear_distill_loss``.

    fastdistill.offline.extract_topk(model, batches, k, temperature, out_dir)   # to disk
    fastdistill.offline.TopkDataset(out_dir), collate_topk, iter_batches        # read back
    fastdistill.offline.TopkWriter(out_dir, k, temperature, vocab_size)         # any source
    fastdistill.offline.topk_logprobs(logits, k, temperature)                   # fused top-k
    fastdistill.offline.from_vllm_output(request_output, k)                     # vLLM
    python -m fastdistill.offline extract ... / info DIR                        # the CLI

``safetensors`` (storage) and ``tqdm`` (progress bar) are imported only when used.
"""

from fastdistill.offline.extract import extract_topk
from fastdistill.offline.store import (TopkDataset, TopkWriter, collate_topk, iter_batches,
                                       read_manifest, tokenizer_fingerprint)
from fastdistill.offline.topk import topk_logprobs
from fastdistill.offline.vllm import from_vllm_output, topk_from_logprob_maps

__all__ = ["extract_topk", "TopkDataset", "TopkWriter", "collate_topk", "iter_batches",
           "read_manifest", "tokenizer_fingerprint", "topk_logprobs", "from_vllm_output",
           "topk_from_logprob_maps"]
