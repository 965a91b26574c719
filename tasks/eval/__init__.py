"""LongBench-Write (LongWriter paper, arXiv 2408.07055) and its judge.

tasks.eval.scoring  the paper's scores: S_l from required vs output length, S_q from the judge
tasks.eval.judge    the judge prompt, its structured-output formats, parsing a verdict
tasks.eval.prompts  the prompt set and the generation request for one prompt
tasks.eval.stages   generate and judge over the store (their Prefect tasks: flows.stages)
tasks.eval.results  results.json, results.md, the scatter plot, the terminal summary
The flow and CLI are flows/eval.py.
"""
