"""`pdserve bench`: a load generator for any pdserve.v1.Gateway address, the peers it compares against
(Hugging Face static batching, the colocated engine, the disaggregated stack, llama.cpp), metrics the field
reports (TTFT, TPOT, end-to-end latency, output tokens/s, goodput) and a report (summary.json, a markdown
table, PNG plots, roofline lines from micro-benchmarks)."""
