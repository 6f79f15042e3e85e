import math

import pytest
import torch

from mla_ext.train import lr_factor, make_scheduler
from mla_ext.train.schedule import phase_steps


def test_warmup_constant_sqrt_decay_values():
    # 100 steps: warmup 10 (steps 0-9), constant to step 79, 1-sqrt decay over steps 80-99
    f = [lr_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1)
    assert f[4] == pytest.approx(0.5)
    assert f[9] == 1.0
    assert all(v == 1.0 for v in f[10:81])
    assert f[85] == pytest.approx(1 - math.sqrt(5 / 20))
    assert f[90] == pytest.approx(1 - math.sqrt(0.5))
    assert f[99] == pytest.approx(1 - math.sqrt(19 / 20))
    assert all(a > b for a, b in zip(f[80:], f[81:]))
    assert all(a < b for a, b in zip(f[:9], f[1:10]))
    assert min(f) > 0


def test_edge_fractions():
    assert [lr_factor(s, 5, 0.0, 0.0) for s in range(5)] == [1.0] * 5
    assert lr_factor(0, 10, 0.0, 1.0) == 1.0
    assert lr_factor(9, 10, 0.0, 1.0) == pytest.approx(1 - math.sqrt(0.9))
    assert phase_steps(18000, 0.06, 0.15) == (1080, 2700)
    # a decay fraction that rounds to no step; the scheduler also asks for step == steps
    assert [lr_factor(s, 3, 0.06, 0.15) for s in range(4)] == [1.0] * 4
    assert lr_factor(10, 10, 0.0, 0.5) == 0.0


@pytest.mark.parametrize("args, match", [
    ((0, 0.1, 0.1), "steps"), ((10, -0.1, 0.1), "warmup"), ((10, 0.1, 1.5), "decay"),
    ((10, 0.6, 0.5), "exceed"),
])
def test_bad_schedule_is_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        phase_steps(*args)


def test_scheduler_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-4)
    sched = make_scheduler(opt, 20, 0.25, 0.25)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-4 * lr_factor(s, 20, 0.25, 0.25) for s in range(20)])
