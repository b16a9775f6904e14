"""Evaluation: native metrics (perplexity, minimal pairs, multiple choice, teacher divergence), the
lm-evaluation-harness adapter, suites and the Scorecard. Import submodules directly
(``from distillgate.evaluate.lm import perplexity``); this package import stays light."""
