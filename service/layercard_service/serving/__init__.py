"""The vLLM fleet: replicas and discovery, the inference proxy and routes, probes, the vLLM HTTP seam.

``vllm_api.py`` is the small interface every vLLM call goes through; ``vllm_process.py`` starts a real server
where we own the process (make run, tests, benchmarks). No torch.
"""
