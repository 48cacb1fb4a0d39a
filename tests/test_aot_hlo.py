"""``jrft.aot.hlo``: collectives inside loops, read from an HLO module's text."""

from jrft.aot.hlo import collectives_in_loops, computations, loop_collective_shapes

HLO = """HloModule m

%layer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %ag = f32[8]{0} all-gather(f32[4]{0} %x), dimensions={0}
  ROOT %t = (s32[], f32[4]) tuple(%i, %y)
}

%layer_cond (p: (s32[], f32[4])) -> pred[] {
  ROOT %c = pred[] compare(%a, %b), direction=LT
}

%decode_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t0), condition=%layer_cond, body=%layer_body
  %ar = f32[4]{0} all-reduce(f32[4]{0} %y), to_apply=%add
  %ags = (f32[4], f32[8]) all-gather-start(f32[4]{0} %z), dimensions={0}
  %agd = f32[8]{0} all-gather-done((f32[4], f32[8]) %ags)
  ROOT %t = (s32[], f32[4]) tuple(%i, %y)
}

%prefill_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ag2 = f32[8]{0} all-gather(f32[4]{0} %x), dimensions={0}
  ROOT %t = (s32[], f32[4]) tuple(%i, %y)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %g = f32[8]{0} all-gather(f32[4]{0} %a), dimensions={0}
  %pre = (s32[], f32[4]) while((s32[], f32[4]) %t1), condition=%layer_cond, body=%prefill_body
  %dec = (s32[], f32[4]) while((s32[], f32[4]) %t2), condition=%layer_cond, body=%decode_body
  ROOT %r = f32[4] get-tuple-element(%dec), index=1
}
"""


def test_computations_are_split_by_name():
    comps = computations(HLO)
    assert {"layer_body", "layer_cond", "decode_body", "prefill_body", "main"} <= set(comps)
    assert "all-gather-start" in comps["decode_body"]


def test_collectives_in_loops_counts_each_instruction_once():
    # in loops: layer_body's gather (reached through decode_body), the async pair once, prefill's gather
    counts = collectives_in_loops(HLO)
    assert counts["all-gather"] == 3 and counts["all-reduce"] == 1
    # the entry's gather runs once per program: never counted


def test_outer_only_keeps_loops_that_hold_a_loop():
    counts = collectives_in_loops(HLO, outer_only=True)
    assert counts["all-gather"] == 2  # decode's async gather + the layer gather inside it; not prefill's
    assert counts["all-reduce"] == 1


def test_loop_collective_shapes():
    assert sorted(loop_collective_shapes(HLO, outer_only=True)) == [(8,), (8,)]
    assert loop_collective_shapes(HLO, "all-reduce") == [(4,)]
