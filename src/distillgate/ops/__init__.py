"""Operations (SPEC G-O): the G-O1 circuit breaker (attack detectors, backend breaker, degraded safe response,
compliance checker, attack corpus)."""
