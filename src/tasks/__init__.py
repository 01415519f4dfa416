"""Task definitions: what an evaluation asks and how an answer is scored. Generation tasks and their
metrics, Wilson / bootstrap intervals and retention (generation.py), log-likelihood multiple-choice tasks
(choice.py), and the project's tasks written as lm-evaluation-harness task folders (lm_tasks.py). Measuring a
model on them is src/eval/'s job."""
