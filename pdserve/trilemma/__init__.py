"""`pdserve trilemma`: latency, cost and fidelity of serving configurations, side by side (see sweep.py)."""
