"""The control plane: Layer Cards on request, placement planning, tuning jobs, adapter deployments.

Runs in the service process. Pure Python: no torch, no gRPC or protobuf, no SQL. It decides and orchestrates;
it reaches the engines and the outside world through seams it is handed (the card engine, job runners, the
vLLM fleet, repositories). May import domain, data, models.builtin, runners, serving, persistence and the
foundations (errors, telemetry, config); never api, card_engine, trainer or torch.
"""
