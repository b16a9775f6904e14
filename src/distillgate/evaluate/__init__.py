"""Evaluation: benchmark file formats (``formats``), native metrics (perplexity, minimal pairs, multiple choice,
teacher divergence), the lm-evaluation-harness adapter, suites, the Scorecard and the per-item
teacher-vs-student diff (``diff``). Import submodules directly
(``from distillgate.evaluate.lm import perplexity``); this package import stays light."""
