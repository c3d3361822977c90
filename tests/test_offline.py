"""fastdistill.offline: the fused temperature-softmax + top-k (torch and Triton), extraction to
safetensors shards and back (round trip, resume, ragged batches, the reader for a DataLoader),
the vLLM adapter, the CLI, and that fastdistill imports without safetensors and tqdm."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import fastdistill as fd
from fastdistill import backends
from fastdistill import offline as fo
from fastdistill.reference import reference_topk_distill_loss

pytest.importorskip("safetensors", reason="safetensors is not installed")

CPU = torch.device("cpu")


def ref_topk(z, k, T):
    lp = torch.log_softmax(z.double() / T, -1)
    v, i = lp.topk(k, -1)
    return i, v


# ---- the fused top-k -----------------------------------------------------------------------------

TRITON = ["triton"] if backends.check("triton", CPU)[0] else []


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float16),
                                           ("torch", torch.bfloat16)]
                         + [(b, torch.float32) for b in TRITON])
def test_topk_logprobs(backend, dtype):
    lead = (3, 5) if backend == "torch" else (2, 2)  # the interpreter sorts slowly
    z = (torch.randn(*lead, 173, dtype=torch.float64) * 3).to(dtype)
    for k, T in ((1, 1.0), (7, 0.7), (40, 1.3)):
        idx, lp = fo.topk_logprobs(z, k, T, backend=backend)
        assert idx.shape == (*lead, k) and idx.dtype == torch.int32 and lp.dtype == torch.float32
        ri, rv = ref_topk(z, k, T)
        torch.testing.assert_close(lp.double(), rv, rtol=1e-5, atol=2e-5)
        # the same values (16-bit logits tie: either index of a tie may come first)
        assert torch.equal(z.gather(-1, idx.long()), z.gather(-1, ri)), (backend, k)
        assert torch.equal(idx.long().sort(-1).values, ri.sort(-1).values) or \
            dtype != torch.float32


def test_topk_logprobs_ties_and_errors():
    z = torch.zeros(2, 64)
    z[0, [5, 9, 33]] = 4.0  # a three-way tie: smaller indices first on every backend
    for b in ["torch"] + TRITON:
        idx, lp = fo.topk_logprobs(z, 3, backend=b)
        assert sorted(idx[0].tolist()) == [5, 9, 33]
        torch.testing.assert_close(lp.exp().sum(-1)[0], torch.tensor(3 * 54.598 / (3 * 54.598
                                                                                   + 61)),
                                   rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 64\]"):
        fo.topk_logprobs(z, 65)
    with pytest.raises(ValueError, match="temperature"):
        fo.topk_logprobs(z, 3, 0.0)
    with pytest.raises(TypeError, match="logits"):
        fo.topk_logprobs(z.long(), 3)


# ---- extraction and the reader -------------------------------------------------------------------

class TinyTeacher(torch.nn.Module):
    def __init__(self, V=97, D=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(V, D, generator=g))
        self.out = torch.nn.Parameter(torch.randn(V, D, generator=g))

    def forward(self, input_ids, attention_mask=None):
        h = self.emb[input_ids].cumsum(1)  # depends on the context
        return types.SimpleNamespace(logits=h @ self.out.t())  # a Hugging Face-like output


def _batches(n=6, B=3, L=11, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, L), generator=g) for _ in range(n)]


def test_extract_round_trip(tmp_path):
    model = TinyTeacher()
    batches = _batches()
    m = fo.extract_topk(model, batches, 8, 1.5, str(tmp_path), tokenizer="demo-tok",
                        shard_tokens=50, progress=False)
    assert m["sequences"] == 18 and m["tokens"] == 18 * 11 and len(m["shards"]) > 2
    assert m["k"] == 8 and m["temperature"] == 1.5 and m["vocab_size"] == 97
    assert m["tokenizer"] == "demo-tok"
    assert 48 <= m["bytes_per_token"] < 48 + 40
    ds = fo.TopkDataset(str(tmp_path))
    assert len(ds) == 18 and ds.k == 8 and ds.vocab_size == 97
    for i in range(18):
        b, r = divmod(i, 3)
        x = ds[i]
        with torch.no_grad():
            ri, rv = ref_topk(model(batches[b]).logits[r], 8, 1.5)
        assert torch.equal(x["indices"], ri)
        assert torch.equal(x["input_ids"], batches[b][r])
        # stored as bfloat16: 8 bits of mantissa
        torch.testing.assert_close(x["logprobs"].double(), rv, rtol=2 ** -8, atol=1e-6)
    # batches for training, in the extraction's order
    for b, batch in enumerate(fo.iter_batches(str(tmp_path), 3)):
        assert torch.equal(batch["input_ids"], batches[b]) and batch["mask"].all()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=fo.collate_topk)
    first = next(iter(loader))
    assert first["indices"].shape == (4, 11, 8)
    # and they are a teacher_topk
    s = torch.randn(4, 11, 97, dtype=torch.float64)
    labels = first["input_ids"].roll(-1, 1)
    for tail in ("bucket", "none", "renormalize"):
        got = fd.distill_loss(s.float(), None, labels, teacher_topk=(first["indices"],
                                                                     first["logprobs"]),
                              topk_tail=tail, temperature=1.5, shift_labels=True)
        want = reference_topk_distill_loss(s, first["indices"], first["logprobs"], labels,
                                           topk_tail=tail, temperature=1.5, shift_labels=True)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_extract_ragged_dict_batches(tmp_path):
    """Dict batches with an attention mask: only the masked positions are stored, per
    sequence; left and right padding both work."""
    model = TinyTeacher()
    ids = torch.randint(0, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False    # right padding
    mask[2, :4] = False    # left padding
    fo.extract_topk(model, [{"input_ids": ids, "attention_mask": mask}], 5, 1.0,
                    str(tmp_path), progress=False)
    ds = fo.TopkDataset(str(tmp_path))
    assert [ds[i]["indices"].shape[0] for i in range(3)] == [7, 10, 6]
    ri, _ = ref_topk(model(ids).logits[2][4:], 5, 1.0)
    assert torch.equal(ds[2]["indices"], ri)
    batch = fo.collate_topk([ds[i] for i in range(3)])
    assert batch["mask"].sum().item() == 23
    # padded rows are harmless with the mask
    s = torch.randn(3, 10, 97)
    loss = fd.distill_loss(s, None, teacher_topk=(batch["indices"], batch["logprobs"]),
                           mask=batch["mask"])
    assert torch.isfinite(loss)


def test_extract_resumes(tmp_path):
    model = TinyTeacher()
    batches = _batches(n=5)
    whole = str(tmp_path / "whole")
    fo.extract_topk(model, batches, 6, 1.0, whole, shard_tokens=40, progress=False)

    def interrupted():
        yield from batches[:2]
        raise KeyboardInterrupt

    part = str(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        fo.extract_topk(model, interrupted(), 6, 1.0, part, shard_tokens=40, progress=False)
    done = fo.read_manifest(part)["sequences"]
    assert 0 < done <= 6  # the finished shards survive
    calls = []
    counting = lambda ids: (calls.append(ids.shape[0]), model(ids))[1]  # noqa: E731
    m = fo.extract_topk(counting, batches, 6, 1.0, part, shard_tokens=40, progress=False)
    assert sum(calls) == 15 - done, "stored sequences are not recomputed"
    a, b = fo.TopkDataset(whole), fo.TopkDataset(part)
    assert len(a) == len(b) == m["sequences"] == 15
    for i in range(15):
        assert all(torch.equal(a[i][key], b[i][key]) for key in ("indices", "logprobs",
                                                                  "input_ids"))
    with pytest.raises(ValueError, match="k=6, this run has k=7"):
        fo.extract_topk(model, batches + _batches(1, seed=5), 7, 1.0, part, progress=False)


def test_extract_plain_logits_and_max_sequences(tmp_path):
    """Any callable returning the logits tensor (or a tuple of them); vocab_size drops padded
    columns; max_sequences stops early."""
    W = torch.randn(60, 64)
    m = fo.extract_topk(lambda ids: (W[ids],), _batches(V=60), 4, 1.0, str(tmp_path),
                        vocab_size=50, max_sequences=7, progress=False)
    assert m["sequences"] == 7 and m["vocab_size"] == 50
    ds = fo.TopkDataset(str(tmp_path))
    assert int(ds[3]["indices"].max()) < 50


def test_tokenizer_fingerprint():
    class Tok:
        def get_vocab(self):
            return {"a": 0, "b": 1}
    f1 = fo.tokenizer_fingerprint(Tok())
    assert f1.startswith("sha256:") and f1 == fo.tokenizer_fingerprint(Tok())
    from fastdistill.demo.bpe import BPE
    bpe = BPE.train("def f(x): return x + 1\n" * 20, 300)
    assert fo.tokenizer_fingerprint(bpe) != f1
    assert fo.tokenizer_fingerprint(None) == "none"


# ---- vLLM ----------------------------------------------------------------------------------------

class Logprob:
    def __init__(self, logprob, rank=None):
        self.logprob, self.rank = logprob, rank


def test_vllm_adapter():
    # prompt [10, 11, 12], completion [13, 14]; k = 2 requested, the actual token added
    prompt_lp = [None,
                 {11: Logprob(-0.5), 3: Logprob(-1.5), 7: Logprob(-2.0)},
                 {4: Logprob(-0.2), 12: Logprob(-3.0), 8: Logprob(-1.9)}]
    comp = types.SimpleNamespace(token_ids=[13, 14], logprobs=[
        {13: Logprob(-0.1), 2: Logprob(-2.5)},
        {14: Logprob(-0.7), 5: Logprob(-0.9), 6: Logprob(-4.0)}])
    out = types.SimpleNamespace(prompt_token_ids=[10, 11, 12], prompt_logprobs=prompt_lp,
                                outputs=[comp])
    ids, idx, lp, mask = fo.from_vllm_output(out, k=2)
    assert ids.tolist() == [10, 11, 12, 13, 14]
    assert mask.tolist() == [True, True, True, True, False]
    assert idx[0].tolist() == [11, 3] and idx[1].tolist() == [4, 8]
    assert idx[2].tolist() == [13, 2] and idx[3].tolist() == [14, 5]
    torch.testing.assert_close(lp[1], torch.tensor([-0.2, -1.9]))
    # completion only
    _, _, _, mask = fo.from_vllm_output(out, k=2, prompt=False)
    assert mask.tolist() == [False, False, True, True, False]
    # plain numbers, k from the smallest mapping, too few entries
    idx, lp, mask = fo.topk_from_logprob_maps([{1: -0.1, 2: -3.0}, None, {4: -1.0, 9: -1.0}])
    assert idx.tolist()[2] == [4, 9] and mask.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="position 0 has 2 logprobs, fewer than k=3"):
        fo.topk_from_logprob_maps([{1: -0.1, 2: -3.0}], k=3)
    # the result is a teacher_topk
    s = torch.randn(5, 20)
    ids, idx, lp, mask = fo.from_vllm_output(out, k=2)
    loss = fd.distill_loss(s, None, teacher_topk=(idx, lp), mask=mask)
    assert torch.isfinite(loss)


# ---- CLI and imports -----------------------------------------------------------------------------

def test_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_teacher.py").write_text(
        "import torch\n"
        "W = torch.randn(40, 40, generator=torch.Generator().manual_seed(0))\n"
        "def build():\n"
        "    return lambda ids: W[ids].cumsum(1)\n")
    torch.save(torch.randint(0, 40, (300,)), tmp_path / "tokens.pt")
    monkeypatch.chdir(tmp_path)
    from fastdistill.offline.__main__ import main
    assert main(["extract", "--model", "my_teacher:build", "--factory", "--data", "tokens.pt",
                 "--k", "5", "--temperature", "2", "--out", "out", "--seq-len", "32",
                 "--batch-size", "4", "--device", "cpu", "--tokenizer", "toy"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["sequences"] == 9 and line["tokens"] == 288 and line["k"] == 5
    assert main(["info", "out"]) == 0
    assert "9 sequences, 288 tokens" in capsys.readouterr().out
    assert fo.TopkDataset(str(tmp_path / "out"))[8]["indices"].shape == (32, 5)


def test_imports_without_safetensors_and_tqdm():
    code = ("import sys\n"
            "sys.modules['safetensors'] = sys.modules['tqdm'] = None  # not importable\n"
            "import torch, fastdistill as fd\n"
            "i, p = fd.offline.topk_logprobs(torch.randn(2, 30), 4)\n"
            "print(float(fd.distill_loss(torch.randn(2, 30), None, teacher_topk=(i, p))) >= 0)\n"
            "import tempfile\n"
            "w = fd.offline.TopkWriter(tempfile.mkdtemp(), 4, 1.0, 30)\n"
            "w.add(i, p)\n"
            "try:\n"
            "    w.flush()\n"
            "except ImportError as e:\n"
            "    print('pip install safetensors' in str(e))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_extract_from_a_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    m = fo.extract_topk(model, [{"input_ids": ids, "attention_mask": mask}], 4, 1.0,
                        str(tmp_path), progress=False)
    assert m["tokens"] == 15 and m["vocab_size"] == 64
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    ri, _ = ref_topk(logits[0], 4, 1.0)
    assert torch.equal(fo.TopkDataset(str(tmp_path))[0]["indices"], ri)
