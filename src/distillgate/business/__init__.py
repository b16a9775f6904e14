"""Business metrics (SPEC G-B): the seven operational KPIs from turn events, A/B deltas with bootstrap
confidence intervals and sample sizes (G-B1), and Shapley attribution to capability modules (G-B2)."""
