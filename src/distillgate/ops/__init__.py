"""Operations (SPEC G-O, D): the G-O1 circuit breaker (attack detectors, backend breaker, degraded safe
response, compliance checker, attack corpus); drift, alerts -> work orders, convergence, the clock they run on."""
