"""GPU versions of the sweep's column loop (`sweep.column_loop`), each tested for equivalence with it."""
