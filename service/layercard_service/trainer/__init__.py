"""What runs inside a tuning worker process: the training loop, LoRA, evaluation, checkpoints.

Started as ``python -m layercard_service.trainer.worker``; it never opens the service's database and reports
through the service's internal API (``reporter.py``). torch and peft live here. Nothing in the service process
imports it except the torch-free listing of checkpoints (``checkpoint_dirs.py``) and artifact checks.
"""
