"""How much does a Layer Card cost, against the floor of one plain LoRA forward+backward over the same probe?

On the built-in model and task builtin:cipher (probe 256), interleaved A B A B to resist drift:
- floor: one LoRA (rank 8, every linear module of every layer) forward+backward over the probe batches;
- card: the whole card without coupling (probe pass with hooks, algebra, cost calibration, peft serving probe);
- card + coupling: the same with the L x L coupling matrix.
Peak memory: a fresh process per measurement reports its peak RSS above the loaded model (ru_maxrss), for the
card and for one LoRA training step on one probe batch. A scaling table repeats the time ratio on
random-initialised Llama configs of growing size.

    .venv/bin/python -m bench.card        # writes bench/results/card.json and card.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [  # (name, hidden, layers, intermediate); head size 64 like the built-in model
    ("tiny-pretrained", 128, 8, 384),
    ("random-h256-l12", 256, 12, 768),
    ("random-h384-l16", 384, 16, 1152),
]


def _load(size: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from layercard_service.models.builtin import builtin_model_path
    from layercard_service.models.loading import load_model

    if size == "tiny-pretrained":
        return load_model(builtin_model_path("tiny"))
    _, hidden, layers, inter = next(s for s in SIZES if s[0] == size)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("tiny"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _examples(n: int):
    from layercard_service.data.tasks import get_task

    return get_task("builtin:cipher").train[:n]


def _settings(probe: int, coupling: bool = False):
    from layercard_service.domain.cards import CardSettings

    return CardSettings(probe_size=probe, compute_coupling=coupling)


def floor_seconds(model, tokenizer, probe: int, examples=None) -> float:
    """One plain peft LoRA forward+backward over the same probe batches the card uses: no hooks, no extras, with
    the trainer's objective (the head only at labelled positions, where exact), which the card's own passes use.

    ``examples``: the probe's examples (default: the first ``probe`` of builtin:cipher)."""
    from peft import LoraConfig, get_peft_model

    from layercard_service.card_engine.arch import detect_layout
    from layercard_service.card_engine.engine import make_probe_batches
    from layercard_service.models.head import training_loss

    settings = _settings(probe)
    batches = make_probe_batches(tokenizer, examples or _examples(probe), settings, torch.device("cpu"))
    layout = detect_layout(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(layout.module_types)))
    try:
        start = time.perf_counter()
        for batch in batches:
            training_loss(peft_model, batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
            peft_model.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    finally:
        peft_model.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config


def card_seconds(model, tokenizer, probe: int, coupling: bool, examples=None) -> tuple[float, dict]:
    """Wall time of a whole card, and how it splits over the engine's phases (from its progress callbacks)."""
    from layercard_service.card_engine.engine import compute_card

    marks: list[tuple[str, float]] = []

    def progress(phase: str, fraction: float, message: str) -> None:
        if not marks or marks[-1][0] != phase:
            marks.append((phase, time.perf_counter()))

    start = time.perf_counter()
    card = compute_card(model, tokenizer, examples or _examples(probe), _settings(probe, coupling), "bench", progress)
    end = time.perf_counter()
    phases = {"setup": (marks[0][1] if marks else end) - start}
    for (phase, began), (_, ended) in zip(marks, [*marks[1:], ("end", end)]):
        phases[phase] = phases.get(phase, 0.0) + ended - began
    calibration = card.training_cost.calibration
    return end - start, {
        "phase_seconds": phases,
        "step_time_relative_error": card.training_cost.step_time_relative_error,
        "peak_memory_relative_error": card.training_cost.peak_memory_relative_error,
        # The fitted cost calibration: what it cost (training steps, rounds) and its held-out error.
        "calibration": {
            "measured_steps": calibration.measured_steps,
            "rounds": calibration.rounds,
            "seconds": calibration.seconds,
            "step_error_p50": calibration.step_error_p50,
            "step_error_p90": calibration.step_error_p90,
            "memory_error_p50": calibration.memory_error_p50,
            "memory_error_p90": calibration.memory_error_p90,
            "notes": calibration.notes,
        },
    }


class _PeakRss:
    """Samples this process's RSS every millisecond: ru_maxrss cannot be reset between measurements."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _peak_child(kind: str, probe: int, model_spec: str, task: str) -> None:
    """Runs in a fresh process: prints peak RSS bytes above the loaded model for one card or one training step
    (the trainer's: its objective, backward, AdamW) on one probe batch."""
    from layercard_service.data.tasks import get_task
    from layercard_service.models.builtin import builtin_model_path
    from layercard_service.models.loading import load_model

    model, tokenizer = (
        _load("tiny-pretrained") if model_spec == "tiny-pretrained" else load_model(builtin_model_path(model_spec))
    )
    examples = get_task(task).train[:probe]
    with torch.no_grad():  # load kernels and thread pools before the baseline, for both kinds alike
        model(input_ids=torch.ones(1, 8, dtype=torch.long))
    if kind == "card":
        with _PeakRss() as rss:
            card_seconds(model, tokenizer, probe, coupling=False, examples=examples)
    else:
        from peft import LoraConfig, get_peft_model

        from layercard_service.card_engine.arch import detect_layout
        from layercard_service.card_engine.engine import make_probe_batches
        from layercard_service.models.head import training_loss

        batch = make_probe_batches(tokenizer, examples, _settings(probe), torch.device("cpu"))[0]
        with _PeakRss() as rss:
            peft_model = get_peft_model(
                model, LoraConfig(r=8, lora_alpha=16, target_modules=list(detect_layout(model).module_types))
            )
            optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
            training_loss(peft_model, batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
            optimizer.step()
    print(json.dumps({"peak_above_model_bytes": rss.peak - rss.base}))


def peak_memory(kind: str, probe: int, model_spec: str = "tiny-pretrained", task: str = "builtin:cipher") -> int:
    """Peak RSS above the loaded model of one card or one training step, each in a fresh process."""
    command = [sys.executable, "-m", "bench.card", "--peak-child", kind, "--probe", str(probe)]
    out = subprocess.run(
        [*command, "--model", model_spec, "--task", task],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_above_model_bytes"])


def run(probe: int, repeats: int, scaling_probe: int) -> dict:
    torch.set_num_threads(2)
    model, tokenizer = _load("tiny-pretrained")
    floor_seconds(model, tokenizer, 32)  # warm-up
    card_seconds(model, tokenizer, 32, coupling=False)
    floors, cards, coupled, fits, coupling_phase = [], [], [], [], []
    for _ in range(repeats):  # A B C A B C: each ratio compares neighbours in time
        floors.append(floor_seconds(model, tokenizer, probe))
        seconds, fit = card_seconds(model, tokenizer, probe, coupling=False)
        cards.append(seconds)
        fits.append(fit)
        seconds, fit = card_seconds(model, tokenizer, probe, coupling=True)
        coupled.append(seconds)
        coupling_phase.append(fit["phase_seconds"].get("coupling", 0.0))
    floor = statistics.median(floors)
    card = statistics.median(cards)
    card_peak, step_peak = peak_memory("card", probe), peak_memory("step", probe)

    scaling = []
    for name, hidden, layers, _ in SIZES:
        m, t = _load(name)
        floor_seconds(m, t, 32)
        f = statistics.median(floor_seconds(m, t, scaling_probe) for _ in range(2))
        c = statistics.median(card_seconds(m, t, scaling_probe, coupling=False)[0] for _ in range(2))
        params = sum(p.numel() for p in m.parameters())
        scaling.append(
            {
                "model": name,
                "hidden": hidden,
                "layers": layers,
                "parameters": params,
                "probe": scaling_probe,
                "floor_seconds": f,
                "card_seconds": c,
                "card_over_floor": c / f,
            }
        )

    return {
        "benchmark": "card",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "setup": {
            "model": "builtin:tiny",
            "task": "builtin:cipher",
            "probe": probe,
            "repeats": repeats,
            "rank": 8,
            "target_modules": "all linear",
        },
        "headline": {
            "card_over_floor": card / floor,
            # The coupling phase's own time (L forward passes), not a difference of two noisy totals.
            "coupling_extra_over_floor": statistics.median(coupling_phase) / floor,
            "peak_memory_over_train_step": card_peak / step_peak,
        },
        "seconds": {"floor": floors, "card": cards, "card_with_coupling": coupled},
        "peak_memory_above_model_bytes": {"card": card_peak, "train_step": step_peak},
        "card_runs": fits,
        "phase_share_of_floor": {
            phase: statistics.median(run["phase_seconds"].get(phase, 0.0) for run in fits) / floor
            for phase in ("setup", "probe", "calibrate", "serving")
        },
        "scaling": scaling,
    }


def report(result: dict) -> str:
    h = result["headline"]
    lines = [
        "# Layer Card cost",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} threads, "
        f"torch {result['machine']['torch']}. Model {result['setup']['model']}, task {result['setup']['task']}, "
        f"probe {result['setup']['probe']} examples, medians of {result['setup']['repeats']} interleaved runs.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| card time / floor (one LoRA fwd+bwd over the probe) | {h['card_over_floor']:.2f}x |",
        f"| coupling's extra time / floor | {h['coupling_extra_over_floor']:.2f}x |",
        f"| card peak memory / one LoRA training step | {h['peak_memory_over_train_step']:.2f}x |",
        "",
        "Card time by phase, over the floor: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in result["phase_share_of_floor"].items()),
        "",
        _calibration_line(result["card_runs"]),
        "",
        "| model | parameters | layers | probe | floor s | card s | card / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["scaling"]:
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['layers']} | {row['probe']} | "
            f"{row['floor_seconds']:.2f} | {row['card_seconds']:.2f} | {row['card_over_floor']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _calibration_line(runs: list[dict]) -> str:
    """The cost calibration inside the card: its training steps and its error on held-out placements."""
    fits = [run["calibration"] for run in runs if "calibration" in run]
    if not fits:
        return "Cost calibration: not recorded."
    med = {key: statistics.median(f[key] for f in fits) for key in ("measured_steps", "rounds", "step_error_p90")}
    return (
        f"Cost calibration (the 'calibrate' phase): {med['measured_steps']:.0f} training steps in "
        f"{med['rounds']:.0f} interleaved rounds (medians over runs); held-out step time error p90 "
        f"{med['step_error_p90']:.1%}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling-probe", type=int, default=64)
    parser.add_argument("--peak-child", choices=["card", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny-pretrained", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="builtin:cipher", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        _peak_child(args.peak_child, args.probe, args.model, args.task)
        return 0
    result = run(args.probe, args.repeats, args.scaling_probe)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "card.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (RESULTS / "card.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
