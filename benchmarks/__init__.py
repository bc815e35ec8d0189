"""Load harness: N simulated robots against a policy server, and the servers to compare."""
