"""Reading an optimized HLO module's text (``compiled.as_text()`` or a ``jrft compile --dump`` file): which
collectives run inside loops, i.e. once per iteration rather than once per program.

A decode step that all-gathers weights inside its ``while`` body moves them over the interconnect for every
generated token; gathered once before the loop they move once per call. The count below is how a test or a
report tells the two apart without a device.
"""

from __future__ import annotations

import re

# "%name (args...) -> result {" opens a computation; "ENTRY %name ..." the entry one.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEE = re.compile(r"\b(?:body|condition|calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def computations(hlo_text: str) -> dict[str, str]:
    """``{computation name: its text}`` of an HLO module's text."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
            if line.startswith("}"):
                current = None
    return {k: "\n".join(v) for k, v in out.items()}


def _reachable(comps: dict[str, str], roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo.extend(_CALLEE.findall(comps[name]))
        for group in _BRANCHES.findall(comps[name]):
            todo.extend(n.strip().lstrip("%") for n in group.split(","))
    return seen


def collectives_in_loops(
    hlo_text: str, kinds: tuple[str, ...] = COLLECTIVES, *, outer_only: bool = False
) -> dict[str, int]:
    """How many collective instructions of each kind sit in a ``while`` body (or anything it calls), counted
    once per instruction (not per iteration). Async pairs (``all-gather-start``/``-done``) count once.

    ``outer_only``: only loops that hold another loop, e.g. the sampler's decode loop (one iteration per
    token, a scan over layers inside) but not the prefill's scan over layers (one pass per call)."""
    counts = dict.fromkeys(kinds, 0)
    for kind, _ in _loop_collectives(hlo_text, kinds, outer_only):
        counts[kind] += 1
    return counts


def loop_collective_shapes(hlo_text: str, kind: str = "all-gather", *, outer_only: bool = False) -> list:
    """The result shapes (``(dims...)``, the last tuple element for async starts) of each ``kind``
    collective in a loop, as :func:`collectives_in_loops` finds them."""
    return [shape for _, shape in _loop_collectives(hlo_text, (kind,), outer_only)]


_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _loop_collectives(hlo_text: str, kinds, outer_only: bool):
    comps = computations(hlo_text)
    bodies = [m for text in comps.values() for m in _WHILE_BODY.findall(text)]
    if outer_only:
        bodies = [b for b in bodies if any(_WHILE_BODY.search(comps[c]) for c in _reachable(comps, [b]))]
    for name in sorted(_reachable(comps, bodies)):
        for line in comps[name].splitlines():
            for kind in kinds:
                # "= type all-gather(" or "all-gather-start(" (the "-done" half is not counted again)
                m = re.search(rf"=\s*(.*?)\s{re.escape(kind)}(?:-start)?\(", line)
                if m:
                    shapes = _SHAPE.findall(m.group(1))
                    dims = shapes[-1] if shapes else ""
                    yield kind, tuple(int(d) for d in dims.split(",") if d)


def custom_calls_in_loops(hlo_text: str, target: str, *, outer_only: bool = False) -> int:
    """How many ``custom-call``s to ``target`` (e.g. ``"tpu_custom_call"``, a Pallas kernel on TPU) sit in a
    ``while`` body or anything it calls (``outer_only``: as in :func:`collectives_in_loops`)."""
    comps = computations(hlo_text)
    bodies = [m for text in comps.values() for m in _WHILE_BODY.findall(text)]
    if outer_only:
        bodies = [b for b in bodies if any(_WHILE_BODY.search(comps[c]) for c in _reachable(comps, [b]))]
    needle = f'custom_call_target="{target}"'
    return sum(comps[name].count(needle) for name in _reachable(comps, bodies))
