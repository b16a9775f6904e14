"""Operations (SPEC G-O, D): drift, alerts -> work orders, convergence, the clock they run on."""
