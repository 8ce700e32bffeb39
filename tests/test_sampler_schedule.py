"""The flow-matching schedule and Euler update are the original's (diffusers FlowMatchEuler, shift 3)."""

import logging

import pytest
import torch

from liveavatar.streaming.sampler import FlowMatchEuler, guided_velocity

SPEC_TIMESTEPS = [1000.0, 857.6923217773, 602.1505737305, 8.9285717010]
SPEC_SIGMAS = [1.0, 0.8576923013, 0.6021505594, 0.0089285718, 0.0]


def test_four_step_schedule_equals_spec_numbers():
    s = FlowMatchEuler(4)
    assert s.timesteps.dtype == s.sigmas.dtype == torch.float32
    torch.testing.assert_close(s.timesteps, torch.tensor(SPEC_TIMESTEPS), rtol=0, atol=1e-7 * 1000)
    torch.testing.assert_close(s.sigmas, torch.tensor(SPEC_SIGMAS), rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps", [2, 3, 4, 5, 6])
def test_schedule_matches_diffusers_for_other_step_counts(steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)
    ref.set_timesteps(steps)
    ours = FlowMatchEuler(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)


def test_non_distilled_step_count_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="liveavatar.streaming.sampler"):
        FlowMatchEuler(6)
    assert "distilled for 4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="liveavatar.streaming.sampler"):
        FlowMatchEuler(4)
    assert caplog.text == ""


def test_euler_step_forms_product_in_bf16_and_sum_in_fp32():
    s = FlowMatchEuler(4)
    x = torch.randn(16, 3, 4, 4).bfloat16()
    v = torch.randn(16, 3, 4, 4).bfloat16()
    out = s.step(0, x, v)
    dt = s.sigmas[1] - s.sigmas[0]
    expected = (x.float() + (dt * v).bfloat16().float()).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    # the last step lands on sigma 0: x0 = x - sigma * v
    x32, v32 = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(s.step(3, x32, v32), x32 - s.sigmas[3] * v32)


def test_guidance_is_off_at_scale_zero_and_extrapolates_otherwise():
    cond, uncond = torch.ones(3), torch.zeros(3)
    assert guided_velocity(cond, uncond, 0.0) is cond
    torch.testing.assert_close(guided_velocity(cond, uncond, 4.5), torch.full((3,), 4.5))
