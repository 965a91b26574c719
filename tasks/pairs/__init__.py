"""DPO preference pairs from AgentWrite variants (LongWriter paper, arXiv 2408.07055, sec. 4.1).

The paper's long-output DPO data: for each writing instruction, sample 4 outputs, score them
with the quality judge combined with the length-following score S_l, take the highest-scoring
output as the chosen answer and one of the others, at random, as the rejected one.

Here the candidates of one instruction are its accepted build sample (variant 0) and K extra
AgentWrite samples written on the SAME stored plan with other sampling: variant v sends
`seed=v` (and the configured temperature), so every variant call has its own idempotency key
and goes through the store cache (`tasks.runtime.generate`): a rerun never pays twice.

Score of a candidate, on 0-100 (`combined_score`):
  S_q = mean of the six judge dimensions, each (rating - 1) * 25, as LongBench-Write scores
        quality (`tasks.eval.scoring`); the judge sees the instruction and the response only;
  S_l = the paper's length score against the instruction's required length, when known;
  S   = (S_q + S_l) / 2, LongBench-Write's total, when the length is known; else S = S_q
        (an instruction without a required length has nothing to follow; the comparison is
        within one instruction, so the scale stays consistent).

Selection (`select_pair`): chosen = the best-scoring variant that passes the quality filters
(`tasks.filters` without the length floor: no refusal, truncation, error text, loops); rejected
= a random lower-scoring variant whose margin is at least `min_margin` (the paper's rule;
`rejected="worst"` takes the lowest instead). Any scored variant may be rejected, filtered
ones included: a truncated or looping answer is a genuine bad answer. An instruction is
skipped, with the reason stored, when fewer than two variants were scored (unscored judge
answers are counted, never dropped silently), when no clean variant was scored, or when no
variant is `min_margin` below the best (a tie is never a preference).

tasks.pairs.selection: the pure core (scores, selection, records, export).
tasks.pairs.variants: the stages over the store (write and judge the variants, select and
export); their thin Prefect tasks are in flows/stages.py, the flow in flows/pairs.py.
"""
