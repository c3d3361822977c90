"""A byte-level BPE tokenizer trained on the fly (Sennrich et al. 2016, "Neural Machine
Translation of Rare Words with Subword Units"; byte-level as in GPT-2).

Text is split into pre-tokens (identifier runs, digit runs, punctuation runs, whitespace runs,
with a single leading space kept on the following word), each pre-token starts as its UTF-8
bytes, and the most frequent adjacent pair (ties: the smallest pair) is merged into a new token
until the vocabulary is full. Pair counts are updated incrementally, only in the words a merge
touches, with a lazy max-heap, so training on a few MB takes seconds.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

PRETOKEN = re.compile(r" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z_0-9]+|\s+")


class BPE:
    def __init__(self, merges: List[Tuple[int, int]]):
        self.merges = merges
        self.rank = {p: i for i, p in enumerate(merges)}
        self.vocab: Dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for i, (a, b) in enumerate(merges):
            self.vocab[256 + i] = self.vocab[a] + self.vocab[b]
        self._cache: Dict[str, List[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPE":
        words = Counter(PRETOKEN.findall(text))
        seqs = [list(w.encode("utf-8")) for w in words]
        counts = list(words.values())
        pairs: Counter = Counter()
        where = defaultdict(set)
        for wid, seq in enumerate(seqs):
            for p in zip(seq, seq[1:]):
                pairs[p] += counts[wid]
                where[p].add(wid)
        heap = [(-c, p) for p, c in pairs.items()]
        heapq.heapify(heap)
        merges: List[Tuple[int, int]] = []
        while len(merges) < vocab_size - 256 and heap:
            negc, pair = heapq.heappop(heap)
            if pairs.get(pair, 0) != -negc or negc == 0:
                continue  # stale heap entry
            new = 256 + len(merges)
            merges.append(pair)
            changed = Counter()
            for wid in list(where[pair]):
                seq, c = seqs[wid], counts[wid]
                for p in zip(seq, seq[1:]):
                    changed[p] -= c
                out, i = [], 0
                while i < len(seq):
                    if i + 1 < len(seq) and seq[i] == pair[0] and seq[i + 1] == pair[1]:
                        out.append(new)
                        i += 2
                    else:
                        out.append(seq[i])
                        i += 1
                seqs[wid] = out
                for p in zip(out, out[1:]):
                    changed[p] += c
                    where[p].add(wid)
            for p, d in changed.items():
                if d:
                    pairs[p] += d
                    if pairs[p] > 0:
                        heapq.heappush(heap, (-pairs[p], p))
            del pairs[pair]
            del where[pair]
        return cls(merges)

    def _encode_word(self, word: str) -> List[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        seq = list(word.encode("utf-8"))
        while len(seq) > 1:
            best = min(zip(seq, seq[1:]), key=lambda p: self.rank.get(p, 1 << 30))
            r = self.rank.get(best)
            if r is None:
                break
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(256 + r)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seq = out
        self._cache[word] = seq
        return seq

    def encode(self, text: str) -> List[int]:
        out: List[int] = []
        for w in PRETOKEN.findall(text):
            out.extend(self._encode_word(w))
        return out

    def decode(self, ids) -> str:
        return b"".join(self.vocab[int(i)] for i in ids).decode("utf-8", errors="replace")
