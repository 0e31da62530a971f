"""`pdserve eval`: what a weight format costs in fidelity, measured against the fp32 reference."""
