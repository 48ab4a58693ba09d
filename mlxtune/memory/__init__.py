"""Memory: the estimate of a run's peak, the plan that makes a run fit its budget, and the guard during the run.

One package, imports pointing one way (lowest first; `tests/test_layers.py` holds them to it):

- `limits.py`   the loss's chunks and streams, the float-copy share of a quantized base: defined once, used by the
                training code and counted by the estimate (no MLX import);
- `budget.py`   the unit (GB = 10^9 bytes) and the budget: `--memory` or what this machine can give;
- `estimate.py` peak bytes from shapes alone: `ModelFacts` (the weight files' headers), `RunShape` (the settings
                that change memory), `BatchShape` (one micro-batch), `estimate` (the larger of the phases over
                every batch), `inference_bytes` (weights + a KV cache);
- `planner.py`  a dataset and settings turned into those shapes, settings that fit, `MemoryPlan` (the verdict);
- `guard.py`    during the run: MLX's limit, the measured peak, smaller micro-batches when it overshoots;
- `preference.py` DPO/ORPO: batches of pairs; `report.py` what `mlxtune plan` shows.

An objective with batches of its own (preference pairs, RL rollouts) plans with these calls:

    budget, source = memory_budget(settings.memory)                 # budget.py
    facts = ModelFacts.from_dir(model_path)                         # estimate.py: headers only, no weights loaded
    run = run_shape(settings, facts=facts, budget=budget)           # planner.py: a LoraSettings-like object
    value = estimate(facts, run, [BatchShape(rows, length, supervised), ...], eval_batches)   # estimate.py
    plan = MemoryPlan(value.total <= budget, value, budget, source)   # planner.py

`BatchShape.supervised` is the positions that go through the head (padded as the step pads them); a forward-only
pass (a reference model) is an `eval_batches` entry. A phase of the objective's own (RL's rollout: a KV cache and
the sampler's vocabulary-sized rows) is `fixed_parts(facts, run)` (what every phase holds) plus its own terms
(`kv_cache_bytes`), compared with `estimate(...)` of its update: the peak is the larger. Such an objective's module
lives here, beside `preference.py` (`memory/grpo.py`, in the "training commands" layer of `tests/test_layers.py`).
"""
