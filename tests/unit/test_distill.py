"""FST-distill (mode fst-distill): the reverse-KL term on hand-computed tensors, and its gradient
through the trainer on a tiny Llama against the formula written out independently."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fst.config import DistillConfig, SlowConfig, TrainConfig
from fst.rollout import Rollout
from fst.slow.losses import reverse_kl_loss
from fst.slow.trainer import DistillBatch, SlowTrainer, completion_logits


def test_reverse_kl_on_hand_computed_tensors():
    # One position, V = 3: the student is uniform, the teacher (1/2, 1/4, 1/4).
    student = torch.zeros(1, 1, 3, requires_grad=True)
    teacher = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    loss, kl = reverse_kl_loss(student, teacher, torch.ones(1, 1), num_tokens=1)
    want = (math.log((1 / 3) / 0.5) + 2 * math.log((1 / 3) / 0.25)) / 3  # Σ p_s log(p_s/p_t)
    assert float(loss) == pytest.approx(want, abs=1e-6) and float(kl) == pytest.approx(want)
    loss.backward()
    # d KL / d z_k = p_k (log p_k - log t_k - KL): here (1/3)(log(2/3) - want), ...
    p = torch.full((3,), 1 / 3)
    formula = p * (torch.log(p) - teacher[0, 0] - want)
    assert torch.allclose(student.grad[0, 0], formula, atol=1e-6)
    assert float(student.grad.sum()) == pytest.approx(0.0, abs=1e-6)  # softmax's invariance


def test_reverse_kl_temperature_mask_and_normaliser():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    T = 0.7
    loss, kl = reverse_kl_loss(student, teacher, mask, num_tokens=4, temperature=T)
    loss.backward()
    ps, pt = torch.softmax(student.detach() / T, -1), torch.softmax(teacher / T, -1)
    per = (ps * (ps.log() - pt.log())).sum(-1)  # (2, 3)
    assert float(kl) == pytest.approx(float((per * mask).sum()), rel=1e-5)
    assert float(loss) == pytest.approx(float((per * mask).sum()) / 4, rel=1e-5)
    formula = ps * (ps.log() - pt.log() - per[..., None]) / T * mask[..., None] / 4
    assert torch.allclose(student.grad, formula, atol=1e-6)  # padding gets no gradient


def test_reverse_kl_is_zero_with_zero_gradient_for_equal_contexts():
    logits = torch.randn(2, 4, 7)
    student = logits.clone().requires_grad_(True)
    loss, kl = reverse_kl_loss(student, logits, torch.ones(2, 4), num_tokens=8, temperature=1.3)
    loss.backward()
    assert abs(float(loss)) < 1e-6 and abs(float(kl)) < 1e-5
    assert float(student.grad.abs().max()) < 1e-6


def sampled(prompt: list[int], completion: list[int]) -> Rollout:
    return Rollout(prompt, completion, [0.0] * len(completion), "", True)


def test_completion_logits_line_up_with_a_full_forward(tiny_llama):
    rows = [sampled([1, 2, 3, 4], [5, 6]), sampled([7, 8], [9, 10, 11])]
    logits, mask = completion_logits(tiny_llama, rows, pad_id=0, device=torch.device("cpu"))
    assert logits.shape[:2] == (2, 3) and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with torch.no_grad():
        for b, r in enumerate(rows):
            full = tiny_llama(torch.tensor([r.prompt_ids + r.completion_ids])).logits[0]
            p = len(r.prompt_ids)
            for t in range(len(r.completion_ids)):
                assert torch.allclose(logits[b, t], full[p - 1 + t], atol=1e-5)


def test_distill_gradient_on_a_tiny_llama_equals_the_formula(tiny_llama):
    """SlowTrainer.distill_backward's gradient on every parameter equals the gradient of
    weight · Σ_t KL(π_θ(·|seed, y<t) ‖ sg π_θ(·|best, y<t)) / tokens, computed row by row from
    plain forwards; with the teacher's context equal to the student's it is zero."""
    seed_a, seed_b, best_a, best_b = [1, 2, 3], [1, 2, 4, 4], [11, 12, 3], [13, 2, 14, 4]
    students = [sampled(seed_a, [5, 6, 7]), sampled(seed_b, [8, 9]), sampled(seed_a, [10])]
    teachers = [best_a, best_b, best_a]
    weight, T = 0.5, 0.8
    cfg = SlowConfig(micro_batch_size=2)
    trainer = SlowTrainer(tiny_llama, cfg, temperature=T, pad_id=0)
    trainer.model.zero_grad()
    m = trainer.distill_backward(DistillBatch(students, teachers, weight), students[0])
    got = [p.grad.clone() for p in tiny_llama.parameters()]

    ref = copy.deepcopy(tiny_llama)
    ref.zero_grad()
    tokens = sum(len(s.completion_ids) for s in students)
    total = torch.zeros(())
    for s, teacher_prompt in zip(students, teachers, strict=True):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        z_s = ref(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0, p - 1 : p - 1 + c]
        with torch.no_grad():
            q = len(teacher_prompt)
            z_t = ref(torch.tensor([teacher_prompt + s.completion_ids])).logits[
                0, q - 1 : q - 1 + c
            ]
        log_s, log_t = torch.log_softmax(z_s / T, -1), torch.log_softmax(z_t / T, -1)
        total = total + (log_s.exp() * (log_s - log_t)).sum()
    (weight * total / tokens).backward()
    assert m["distill_kl"] == pytest.approx(float(total) / tokens, rel=1e-4)
    assert m["distill_loss"] == pytest.approx(weight * float(total) / tokens, rel=1e-4)
    assert m["distill_tokens"] == tokens
    for g, p in zip(got, ref.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().max()) > 1e-4 for g in got)  # the contexts differ: a real gradient

    tiny_llama.zero_grad()
    same = [s.prompt_ids for s in students]
    m = trainer.distill_backward(DistillBatch(students, same, weight), students[0])
    assert abs(m["distill_kl"]) < 1e-6
    assert all(float(p.grad.abs().max()) < 1e-6 for p in tiny_llama.parameters())


def test_a_step_with_distill_updates_even_without_reward_signal(tiny_llama):
    """Flat rewards give the policy-gradient term nothing; the distill term still moves the
    weights (and its metrics come out of the step)."""
    rs = [sampled([1, 2, 3], [4, 5]), sampled([1, 2, 3], [6])]
    trainer = SlowTrainer(tiny_llama, SlowConfig(lr=1e-2), temperature=1.0, pad_id=0)
    before = [p.detach().clone() for p in tiny_llama.parameters()]
    distill = DistillBatch([sampled([1, 2, 3], [7, 8])], [[9, 9, 3]], weight=1.0)
    m = trainer.step(rs, [0.0, 0.0], distill)
    assert m["updated"] == 1.0 and m["trained_seqs"] == 0 and m["distill_kl"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_llama.parameters(), strict=True))


def test_distill_weight_ramps_and_the_mode_is_validated():
    d = DistillConfig(weight=2.0, warmup_steps=4)
    assert [d.weight_at(s) for s in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert DistillConfig().weight_at(0) == 1.0
    task = {"name": "arithmetic", "trainSize": 4, "valSize": 2, "testSize": 2}
    with pytest.raises(ValueError, match=r"fast.topK \(K=8\).*mode fst-distill"):
        TrainConfig.model_validate(
            {"mode": "fst-distill", "task": task, "fast": {"topK": 8}, "slow": {"groupSize": 4}}
        )
