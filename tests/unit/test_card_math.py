"""The card's numbers against independent computations, on the built-in pretrained model (METHOD.md)."""

from __future__ import annotations

import random

import pytest
import torch

from layercard_service.card_engine.arch import detect_layout
from layercard_service.card_engine.coupling import cosine_matrix, directional_jvp, finite_difference
from layercard_service.card_engine.engine import compute_card, make_probe_batches
from layercard_service.card_engine.probe import attach_lora, lora_modules, module_type, run_probe
from layercard_service.card_engine.resnorm import module_figures
from layercard_service.data.encode import IGNORE_INDEX, EncodedExample, collate
from layercard_service.data.tasks import get_task
from layercard_service.domain.cards import CardSettings, calibrated_gain
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model

SETTINGS = CardSettings(probe_size=64, batch_size=16, max_seq_len=64)


@pytest.fixture
def tiny():
    """A fresh copy per test: attaching LoRA wraps the model in place."""
    return load_model(builtin_model_path("tiny"))


@pytest.fixture(scope="module")
def examples():
    return get_task("builtin:cipher").train[:200]


class Probed:
    """The probe pass on the built-in model, left attached so tests can poke the adapter."""

    def __init__(self, model, tokenizer, batches, settings: CardSettings = SETTINGS) -> None:
        self.layout = detect_layout(model)
        self.settings = settings
        self.batches = batches
        self.peft = attach_lora(
            model, self.layout, self.layout.module_types, settings.rank, settings.lora_alpha, settings.seed
        )
        self.lora = lora_modules(self.peft, self.layout)
        self.probe = run_probe(self.peft, self.layout, batches)
        self.figures = {
            key: module_figures(p, self.probe.half_completion_tokens, settings.scaling, settings.damping)
            for key, p in self.probe.modules.items()
        }

    def mean_loss(self) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.batches:
                logits = self.peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                targets = batch["labels"][:, 1:]
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                        targets.reshape(-1),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                )
                count += int((targets != IGNORE_INDEX).sum())
        return total / count

    def set_b(self, values) -> None:
        with torch.no_grad():
            for key, layer in self.lora.items():
                weight = layer.lora_B["default"].weight
                weight.copy_(values[key]) if key in values else weight.zero_()


@pytest.fixture(scope="module")
def probed(examples):
    model, tokenizer = load_model(builtin_model_path("tiny"))
    batches = make_probe_batches(tokenizer, examples, SETTINGS, torch.device("cpu"))
    state = Probed(model, tokenizer, batches)
    yield state
    state.peft.unload()


def test_half_resnorm_is_the_optimal_decrease_of_the_quadratic_model(probed):
    """Solve min_b gᵀb + ½ bᵀ H b with H = s² (I ⊗ S) built explicitly, and compare with ½ Res²."""
    s = probed.settings.scaling
    for key in [(0, "self_attn.o_proj"), (5, "mlp.down_proj"), (7, "self_attn.q_proj")]:
        fig = probed.figures[key]
        d_out = fig.grad.shape[0]
        g = fig.grad.reshape(-1)  # vec(B) in row-major order: B[i, j] -> i * r + j
        hessian = s * s * torch.kron(torch.eye(d_out, dtype=torch.float64), fig.damped_cov)
        b_star = torch.linalg.solve(hessian, -g)
        q_min = float(g @ b_star + 0.5 * b_star @ hessian @ b_star)
        assert -q_min == pytest.approx(0.5 * fig.resnorm_sq, rel=1e-8)
        assert fig.resnorm_sq > 0


def test_small_step_along_whitened_direction_matches_prediction(probed):
    """A real step B = -ε δ on one layer changes the probe loss by -ε tr(G S⁻¹ Gᵀ) to first order."""
    s2 = probed.settings.scaling**2
    base = probed.mean_loss()
    for layer in (1, 6):
        keys = [k for k in probed.figures if k[0] == layer]
        rate = sum(probed.figures[k].resnorm_sq * s2 for k in keys)  # first-order decrease per unit ε
        eps = 2e-3 / rate
        probed.set_b({k: (-eps * probed.figures[k].step).float() for k in keys})
        try:
            change = probed.mean_loss() - base
        finally:
            probed.set_b({})
        assert change < 0
        assert change == pytest.approx(-eps * rate, rel=0.1)


def test_activation_energy_matches_inputs_captured_separately(tiny, examples):
    model, tokenizer = tiny
    batches = make_probe_batches(tokenizer, examples, SETTINGS, torch.device("cpu"))
    layout = detect_layout(model)
    captured: dict[tuple[int, str], list[float]] = {}
    mask = {}
    handles = []
    for index, block in enumerate(layout.blocks(model)):
        for name, module in block.named_modules():
            if name.endswith(("q_proj", "down_proj")):

                def hook(mod, args, out, key=(index, name)):
                    x = args[0][mask["m"]].double()
                    acc = captured.setdefault(key, [0.0, 0])
                    acc[0] += float((x * x).sum())
                    acc[1] += x.shape[0]

                handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            mask["m"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    state = Probed(model, tokenizer, batches)
    try:
        for key, (total, count) in captured.items():
            # rel 1e-5: the engine sums each batch in float32 (in an order that differs between CPUs); a wrong
            # mask or denominator is off by far more
            assert state.figures[key].activation_energy == pytest.approx(total / count, rel=1e-5)
    finally:
        state.peft.unload()


def test_coupling_symmetric_unit_diagonal_and_fd_agrees_with_jvp(probed):
    s2 = probed.settings.scaling**2
    steps, rate = {}, {}
    for key, fig in probed.figures.items():
        steps.setdefault(key[0], {})[key] = fig.step
        rate[key[0]] = rate.get(key[0], 0.0) + fig.resnorm_sq * s2
    batch = probed.batches[0]
    deltas = finite_difference(probed.peft, probed.lora, steps, rate, batch)
    rho = cosine_matrix(deltas)
    assert torch.allclose(rho, rho.T)
    assert torch.allclose(torch.diagonal(rho), torch.ones(len(deltas), dtype=rho.dtype))
    assert float(rho.abs().max()) <= 1 + 1e-9
    for layer in (0, 4):
        exact = directional_jvp(probed.peft, probed.lora, steps[layer], batch)
        fd = deltas[layer]
        cos = float(torch.nn.functional.cosine_similarity(exact.detach(), fd, dim=0))
        assert cos > 0.999
        assert float((fd - exact.detach()).norm() / exact.detach().norm()) < 0.05


def _self_sampled_batches(model, tokenizer, prompts: list[str], new_tokens: int, batch_size: int):
    """Targets drawn from the base model's own predictive distribution: no correctable signal by construction.

    Plain ancestral sampling from the full softmax (no top-k, top-p or temperature), batched with left padding.
    """
    torch.manual_seed(0)
    pad = tokenizer.pad_token_id
    encoded = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
            for p in prompts[start : start + batch_size]
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
                eos_token_id=None,
            )
        for row, sampled in zip(rows, out[:, width:].tolist()):
            encoded.append(EncodedExample(tuple(row + sampled), tuple([IGNORE_INDEX] * len(row) + sampled)))
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def test_split_half_resnorm_vanishes_without_signal(tiny, examples):
    model, tokenizer = tiny
    prompts = [ex.prompt for ex in random.Random(1).sample(list(examples), 128)]
    noise = Probed(model, tokenizer, _self_sampled_batches(model, tokenizer, prompts, 4, 16))
    try:
        plain = sum(f.resnorm_sq for f in noise.figures.values())
        split = sum(f.resnorm_sq_split_half for f in noise.figures.values())
    finally:
        noise.peft.unload()
    assert plain > 0
    assert abs(split) < 0.25 * plain  # noise only: the split-half estimate is near zero, the plain one is not

    real = Probed(
        model,
        tokenizer,
        make_probe_batches(
            tokenizer, examples, CardSettings(probe_size=128, batch_size=16, max_seq_len=64), torch.device("cpu")
        ),
    )
    try:
        plain_real = sum(f.resnorm_sq for f in real.figures.values())
        split_real = sum(f.resnorm_sq_split_half for f in real.figures.values())
    finally:
        real.peft.unload()
    assert split_real > 0.5 * plain_real  # a learnable task: most of Res² is signal


def test_card_end_to_end_on_builtin_model(tiny, examples):
    model, tokenizer = tiny
    card = compute_card(
        model,
        tokenizer,
        examples,
        CardSettings(probe_size=64, batch_size=16, max_seq_len=64, compute_coupling=True),
        "builtin:tiny",
    )
    assert card.num_layers == 8 and len(card.layers) == 8
    assert sum(row.resnorm_share for row in card.layers) == pytest.approx(1.0)
    # ½Res² calibrated to the loss: never more than the probe loss, the local figure where it is small
    for row in card.layers:
        assert 0 < row.predicted_gain < card.probe_loss
        assert row.predicted_gain <= 0.5 * row.resnorm_sq
        assert row.predicted_gain == pytest.approx(calibrated_gain(0.5 * row.resnorm_sq, card.probe_loss))
    assert {m.module_type for m in card.layers[0].modules} == set(card.module_types)
    assert card.training_cost.measured_full_step_seconds > 0
    assert 0 <= card.training_cost.peak_memory_relative_error < 0.25
    assert card.training_cost.predicted_partial_step_seconds < card.training_cost.predicted_full_step_seconds
    assert len(card.coupling) == 8
    # The model is handed back without LoRA wrappers.
    assert not any("lora" in name for name, _ in model.named_modules())
    assert module_type((0, "self_attn.q_proj")) == "q_proj"


def test_stored_cost_figures_rebuild_the_cost_model(tiny, examples):
    """The card keeps every per-block figure the planner needs to predict time(S) without the model."""
    from layercard_service.card_engine.cost import CostModel
    from layercard_service.domain.card_codec import card_from_dict, card_to_dict

    model, tokenizer = tiny
    card = compute_card(model, tokenizer, examples, SETTINGS, "builtin:tiny")
    again = card_from_dict(card_to_dict(card))
    t = again.training_cost
    rebuilt = CostModel(
        forward_seconds=[row.forward_seconds for row in again.layers],
        forward_pass_seconds=t.forward_pass_seconds,
        forward_nograd_seconds=t.forward_nograd_seconds,
        backward_adapted_seconds=[row.backward_seconds for row in again.layers],
        backward_pass_seconds=t.backward_pass_seconds,
        saved_adapted_bytes=[row.activation_bytes for row in again.layers],
        saved_pass_bytes=t.pass_activation_bytes,
        fixed_seconds=t.fixed_seconds,
        static_bytes=t.base_memory_bytes,
        adapter_bytes_per_layer=[4 * row.adapter_bytes for row in again.layers],
    )
    assert rebuilt.step_seconds(t.validation_layers) == pytest.approx(t.predicted_partial_step_seconds)
    assert rebuilt.step_seconds(range(card.num_layers)) == pytest.approx(t.predicted_full_step_seconds)
    assert rebuilt.peak_bytes(range(card.num_layers)) == t.predicted_full_peak_memory_bytes
