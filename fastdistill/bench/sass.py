"""Control flow of a SASS listing: basic blocks, loops, and the steady-state path of a loop.

Input: the compact listing of :func:`fastdistill.bench.aot.compact_sass` (one
``ADDR: [@P] OPCODE operands`` line per instruction). Nothing here knows any kernel.

- Basic blocks start at the first instruction, at every branch target and after every branch,
  EXIT or RET; a predicated branch or EXIT falls through as well.
- A loop is a back edge (a branch to an address at or before itself); its body is the natural
  loop (every block that reaches the latch without passing the header). Loops with the same
  header are one loop. A loop whose body lies inside another's is nested in it.
- The steady-state path of a loop runs from its header to a latch; of a loop-free region, from
  the entry to an EXIT. It (a) passes through a global load and a global store of the widest
  widths the region has, if it has any (the aligned vector path, e.g. LDG.E.128, and the path
  that writes the gradient), and among those paths it is the one that (b) touches the fewest
  blocks with narrower global accesses (the scalar fallback for misaligned rows), then (c) loads
  the fewest bits (a run-time teacher dtype: the same-width teacher), then (d) issues the fewest
  instructions (rare branches: a new running maximum, a special case of a math routine). Nested
  loops count zero on the outer path (they are reported on their own, per trip).
- Limits: branches on one run-time value are not correlated (a path may take the load of one
  teacher dtype and the conversion of another); a run-time switch between variants (the CUDA
  feature kernel's loss kind) yields the cheapest variant.
- Predicated instructions count whether or not their predicate holds: they issue.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

_LINE = re.compile(r"^([0-9a-f]+):\s*(.*)$")
_PRED = re.compile(r"^@(!?U?P(?:T|\d+))\s+")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
MUFU = re.compile(r"^MUFU\.(\w+)")
BRANCHES = ("BRA", "BRX", "JMP", "JMX")


@dataclass
class Instr:
    addr: int
    text: str           # without the address
    pred: Optional[str]  # "P0", "!P1", ... or None
    opcode: str         # "LDG.E.128", "FFMA", ...

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def conditional(self) -> bool:
        return self.pred is not None and self.pred not in ("PT", "UPT")

    @property
    def never(self) -> bool:
        return self.pred in ("!PT", "!UPT")


def parse(sass: str) -> List[Instr]:
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        text = m.group(2).strip()
        pm = _PRED.match(text)
        pred = pm.group(1) if pm else None
        body = text[pm.end():] if pm else text
        opcode = body.split()[0] if body else ""
        out.append(Instr(int(m.group(1), 16), text, pred, opcode))
    return out


def branch_target(ins: Instr) -> Optional[int]:
    if ins.base not in BRANCHES:
        return None
    m = _TARGET.search(ins.text)
    return int(m.group(1), 16) if m else None


def global_load_width(ins: Instr) -> int:
    """Bits per thread of a global load (LDG, cp.async LDGSTS), 0 if not one. A TMA load
    (UTMALDG) moves a whole tile: reported as 1024."""
    if ins.base == "UTMALDG":
        return 1024
    if ins.base not in ("LDG", "LDGSTS"):
        return 0
    return _access_bits(ins)


def shared_load_width(ins: Instr) -> int:
    """Bits per thread of a shared-memory load (LDS), 0 if not one."""
    if ins.base != "LDS":
        return 0
    return _access_bits(ins)


def _access_bits(ins: Instr) -> int:
    """Bits per thread a load or store moves, from its size modifier (none: 32)."""
    for m in ins.opcode.split(".")[1:]:
        if m in ("128", "64"):
            return int(m)
        if m in ("U16", "S16"):
            return 16
        if m in ("U8", "S8"):
            return 8
    return 32


def global_store_width(ins: Instr) -> int:
    """Bits per thread of a global store (STG), 0 if not one."""
    if ins.base != "STG":
        return 0
    return _access_bits(ins)


@dataclass
class Block:
    start: int                 # index of the first instruction
    end: int                   # index one past the last
    succ: List[int] = field(default_factory=list)   # block indices
    pred: List[int] = field(default_factory=list)


@dataclass
class Loop:
    header: int                # block index
    latches: List[int]
    body: Set[int]             # block indices
    parent: Optional[int] = None   # index into the loop list
    children: List[int] = field(default_factory=list)


class CFG:
    def __init__(self, sass: str):
        self.ins = parse(sass)
        self._reachable_code()
        self._blocks()
        self._loops()

    # -- construction --

    def _reachable_code(self):
        """Drops the padding at the end: NOPs and the 'BRA self' that closes a function."""
        ins = self.ins
        while ins and ins[-1].base == "NOP":
            ins.pop()
        for i in range(len(ins) - 1, -1, -1):
            if ins[i].base == "BRA" and branch_target(ins[i]) == ins[i].addr and \
                    not ins[i].conditional:
                del ins[i:]
                while ins and ins[-1].base == "NOP":
                    ins.pop()
                break
            if ins[i].base not in ("NOP", "BRA"):
                break

    def _blocks(self):
        ins = self.ins
        index = {x.addr: i for i, x in enumerate(ins)}
        leaders = {0}
        for i, x in enumerate(ins):
            t = branch_target(x)
            if t is not None and t in index:
                leaders.add(index[t])
            if x.base in BRANCHES + ("EXIT", "RET") and i + 1 < len(ins):
                leaders.add(i + 1)
        starts = sorted(leaders)
        self.blocks = [Block(s, e) for s, e in zip(starts, starts[1:] + [len(ins)])]
        self.block_of = {}
        for b, blk in enumerate(self.blocks):
            for i in range(blk.start, blk.end):
                self.block_of[i] = b
        for b, blk in enumerate(self.blocks):
            last = ins[blk.end - 1]
            t = branch_target(last)
            falls = True
            if last.never:
                t = None
            elif last.base in BRANCHES:
                if t is not None and t in index:
                    blk.succ.append(self.block_of[index[t]])
                # "BRA P3, 0x..." / "BRA.DIV UR4, 0x...": a condition operand before the target
                operands = last.text.split(last.opcode, 1)[1]
                falls = last.conditional or "," in operands
            elif last.base in ("EXIT", "RET"):
                falls = last.conditional
            if falls and b + 1 < len(self.blocks):
                blk.succ.append(b + 1)
            blk.succ = sorted(set(blk.succ))
        for b, blk in enumerate(self.blocks):
            for s in blk.succ:
                self.blocks[s].pred.append(b)

    def _loops(self):
        headers: Dict[int, List[int]] = {}
        for b, blk in enumerate(self.blocks):
            for s in blk.succ:
                if s <= b and self._reaches(s, b):  # a back edge that closes a cycle
                    headers.setdefault(s, []).append(b)
        loops = []
        for h, latches in sorted(headers.items()):
            body = {h}
            stack = [l for l in latches if l != h]
            body.update(stack)
            while stack:
                x = stack.pop()
                for p in self.blocks[x].pred:
                    if p not in body and self._reaches(h, p):
                        body.add(p)
                        stack.append(p)
            loops.append(Loop(h, latches, body))
        # nesting: the smallest enclosing loop
        for i, lp in enumerate(loops):
            enclosing = [j for j, o in enumerate(loops) if j != i and lp.body < o.body]
            if enclosing:
                lp.parent = min(enclosing, key=lambda j: len(loops[j].body))
                loops[lp.parent].children.append(i)
        self.loops = loops

    def _reaches(self, a: int, b: int) -> bool:
        """Block b is reachable from block a (a == b counts)."""
        if not hasattr(self, "_reach"):
            self._reach = {}
        if a not in self._reach:
            seen, stack = {a}, [a]
            while stack:
                for s in self.blocks[stack.pop()].succ:
                    if s not in seen:
                        seen.add(s)
                        stack.append(s)
            self._reach[a] = seen
        return b in self._reach[a]

    # -- queries --

    def block_instrs(self, b: int) -> List[Instr]:
        blk = self.blocks[b]
        return self.ins[blk.start:blk.end]

    def inner_blocks(self, loop: Optional[Loop]) -> Set[int]:
        """Blocks of the loops nested directly or deeper inside `loop` (of every loop, when
        `loop` is None, i.e. the function)."""
        kids = loop.children if loop is not None else \
            [i for i, lp in enumerate(self.loops) if lp.parent is None]
        out = set()
        for k in kids:
            out |= self.loops[k].body
        return out

    def steady_path(self, loop: Optional[Loop], must_mufu: bool = False) -> List[int]:
        """Block indices of the steady-state path (see the module doc) of `loop`, or of the
        loop-free part of the function when `loop` is None. must_mufu: the path also passes a
        MUFU operation (a kernel whose work is its exponentials, next to branches that only
        fill zeros)."""
        region = loop.body if loop is not None else set(range(len(self.blocks)))
        inner = self.inner_blocks(loop)
        lw = {b: max((global_load_width(x) for x in self.block_instrs(b)), default=0)
              for b in region}
        sw = {b: max((global_store_width(x) for x in self.block_instrs(b)), default=0)
              for b in region}
        wide_ld, wide_st = max(lw.values(), default=0), max(sw.values(), default=0)

        def cost(b):
            """(blocks with narrower global accesses, bits loaded, instructions), compared in
            that order."""
            if b in inner:
                return (0, 0, 0)
            xs = self.block_instrs(b)
            narrow = int(any(0 < global_load_width(x) < wide_ld or
                             0 < global_store_width(x) < wide_st for x in xs))
            return (narrow, sum(global_load_width(x) for x in xs), len(xs))

        def add(a, c):
            return (a[0] + c[0], a[1] + c[1], a[2] + c[2])

        has_mufu = {b: any(MUFU.match(x.opcode) for x in self.block_instrs(b)) for b in region}

        def seen(b, flags):
            return (flags[0] or (wide_ld > 0 and lw.get(b, 0) == wide_ld),
                    flags[1] or (wide_st > 0 and sw.get(b, 0) == wide_st),
                    flags[2] or not must_mufu or has_mufu.get(b, False))

        if loop is not None:
            start, goals = loop.header, set(loop.latches)
        else:
            start = 0
            goals = {b for b in region
                     if self.block_instrs(b)[-1].base in ("EXIT", "RET")}
        # Dijkstra over (block, passed a widest load, passed a widest store); edges stay in the
        # region and, for a loop, never take the back edge to the header again
        init = (start, seen(start, (False, False, False)))
        dist = {init: cost(start)}
        prev = {}
        heap = [(cost(start), init)]
        best = None
        while heap:
            d, state = heapq.heappop(heap)
            if d != dist.get(state):
                continue
            b, flags = state
            if b in goals and (flags[0] or wide_ld == 0) and (flags[1] or wide_st == 0) and \
                    flags[2]:
                best = state
                break
            for s in self.blocks[b].succ:
                if s not in region or (loop is not None and s == loop.header):
                    continue
                if loop is None and s <= b and s not in inner:
                    continue
                ns = (s, seen(s, flags))
                nd = add(d, cost(s))
                if ns not in dist or nd < dist[ns]:
                    dist[ns] = nd
                    prev[ns] = state
                    heapq.heappush(heap, (nd, ns))
        if best is None:
            return []
        path = [best]
        while path[-1] in prev:
            path.append(prev[path[-1]])
        return [b for b, _ in reversed(path)]

    def path_instrs(self, path: List[int], exclude: Set[int] = frozenset()) -> List[Instr]:
        out = []
        for b in path:
            if b not in exclude:
                out += self.block_instrs(b)
        return out

    def loop_range(self, loop: Loop) -> Tuple[int, int]:
        """First and last instruction addresses of a loop's body."""
        idx = [i for b in loop.body for i in range(self.blocks[b].start, self.blocks[b].end)]
        return self.ins[min(idx)].addr, self.ins[max(idx)].addr


@dataclass
class Counts:
    """What one pass over a path issues."""
    instr: int = 0
    mufu: Dict[str, int] = field(default_factory=dict)
    barriers: int = 0
    shuffles: int = 0
    load_bits: int = 0          # global bits loaded per thread (LDG / LDGSTS)
    store_bits: int = 0
    shared_load_bits: int = 0   # shared-memory bits loaded per thread (LDS)
    widest_load: str = ""
    mma: Dict[str, int] = field(default_factory=dict)   # HGMMA / HMMA shapes
    tma: int = 0

    @property
    def mufu_total(self) -> int:
        return sum(self.mufu.values())


def count(instrs: List[Instr]) -> Counts:
    c = Counts()
    widest = (0, "")
    for x in instrs:
        c.instr += 1
        m = MUFU.match(x.opcode)
        if m:
            c.mufu[m.group(1)] = c.mufu.get(m.group(1), 0) + 1
        if x.base == "BAR":
            c.barriers += 1
        if x.base == "SHFL":
            c.shuffles += 1
        w = global_load_width(x) if not x.never else 0  # "@!PT": issued, never executed
        if w and x.base != "UTMALDG":
            c.load_bits += w
        if x.base == "UTMALDG":
            c.tma += 1
        if w > widest[0]:
            widest = (w, x.opcode)
        c.store_bits += global_store_width(x)
        c.shared_load_bits += shared_load_width(x) if not x.never else 0
        if x.base in ("HGMMA", "HMMA"):
            shape = x.opcode.split(".")[1] if "." in x.opcode else ""
            key = f"{x.base}.{shape}"
            c.mma[key] = c.mma.get(key, 0) + 1
    c.widest_load = widest[1]
    return c


def loop_listing(cfg: CFG, loop: Loop, path: Optional[List[int]] = None) -> str:
    """The loop body's instructions, those on the steady-state path marked with '*'."""
    on = set(path or cfg.steady_path(loop))
    inner = cfg.inner_blocks(loop)
    lines = []
    for b in sorted(loop.body):
        tag = "*" if b in on and b not in inner else ("i" if b in inner else " ")
        for x in cfg.block_instrs(b):
            lines.append(f"{tag} {x.addr:05x}: {x.text}")
        lines.append("")
    return "\n".join(lines)
