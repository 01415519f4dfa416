"""Studies: many training points x seeds, each an ordinary run folder, evaluated on held-out text and summarised
with seed intervals (`python -m src.study study=<name>`; conf/study/, docs/results.md).

- `spec`: the typed study settings (`StudySpec`) and the planned points (`plan_points`).
- `state`: the study's status file (`study.json`): what each point has done, atomically rewritten.
- `stats`: means, 95% t-intervals across seeds and paired differences against the reference row.
- `runner`: trains (subprocess `python -m src.train`), evaluates and summarises; a killed study continues.
"""
