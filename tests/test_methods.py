"""Each baseline's gradient against a plain reference built from per-step vector-Jacobian
products (or, for full backprop, against the unrolled graph without checkpointing)."""
import pytest
import torch

from engine.methods import DRTune, DRaFTLV, FullBackprop, LeapAlign, ReFL, make_method
from engine.schedule import euler_step, flux_sigmas
from tests.test_leap import D, TinyField, reward

T, B, LAM = 7, 2, 3.0


def setup(seed=0):
    model = TinyField()
    sigmas = flux_sigmas(T, 512).double()
    x1 = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, sigmas, x1


def grads(model):
    return torch.cat([model.W.grad.flatten(), model.b.grad])


def vjp(model, x, s, g):
    """g^T dv(x, s)/dtheta at a fixed input x."""
    model.zero_grad()
    (model(x.detach(), s) * g).sum().backward()
    return grads(model).clone()


def dloss_dx(xhat0, lam=LAM):
    x = xhat0.detach().requires_grad_(True)
    torch.relu(lam - reward(x)).mean().backward()
    return x.grad


def no_grad_states(model, x, sigmas, upto):
    states = [x]
    with torch.no_grad():
        for i in range(upto):
            x = euler_step(x, model(x, sigmas[i]), sigmas[i], sigmas[i + 1])
            states.append(x)
    return states


@pytest.mark.parametrize("t", [T - 1, T - 3])
def test_refl(t):
    model, sigmas, x1 = setup()
    out = ReFL(lam=LAM).loss(model, reward, x1, sigmas, t=t)
    out.loss.backward()
    got = grads(model)
    xt = no_grad_states(model, x1, sigmas, t)[t]
    with torch.no_grad():
        xhat0 = xt - sigmas[t] * model(xt, sigmas[t])
    want = vjp(model, xt, sigmas[t], -sigmas[t] * dloss_dx(xhat0))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert out.model_calls == t + 1


@pytest.mark.parametrize("n", [0, 1, 3])
def test_draft_lv(n):
    """The real last step (DRaFT-1) plus n re-noised copies of its x_0, averaged over n + 1."""
    model, sigmas, x1 = setup()
    m = DRaFTLV(lam=LAM, n=n)
    eps = m.draw(T, torch.Generator().manual_seed(5), x1)["eps"]
    assert eps.shape == (n, B, D)
    out = m.loss(model, reward, x1, sigmas, eps=eps)
    out.loss.backward()
    got = grads(model)
    xl = no_grad_states(model, x1, sigmas, T - 1)[T - 1]
    s = sigmas[T - 1]
    with torch.no_grad():
        x0 = xl - s * model(xl, s)
    want = vjp(model, xl, s, -s * dloss_dx(x0))          # the real last step
    for e in eps.double():
        xs = (1 - s) * x0 + s * e
        with torch.no_grad():
            xhat0 = xs - s * model(xs, s)
        want += vjp(model, xs, s, -s * dloss_dx(xhat0))
    want /= n + 1
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert out.model_calls == T + n
    # the reported sample is the sampler's own x_0 (the real last step), and its reward
    torch.testing.assert_close(out.x0, x0)
    torch.testing.assert_close(out.reward, reward(x0))
    with torch.no_grad():
        per = [torch.relu(LAM - reward(x0)).mean()]
        for e in eps.double():
            xs = (1 - s) * x0 + s * e
            per.append(torch.relu(LAM - reward(xs - s * model(xs, s))).mean())
    torch.testing.assert_close(out.loss.detach(), torch.stack(per).mean())


def test_draft_lv_n0_is_draft_1():
    """With no re-noised copies DRaFT-LV is DRaFT-1: ReFL stopped at the last step."""
    model, sigmas, x1 = setup()
    DRaFTLV(lam=LAM, n=0).loss(model, reward, x1, sigmas, eps=torch.zeros(0, B, D)).loss.backward()
    a = grads(model).clone()
    model.zero_grad()
    ReFL(lam=LAM).loss(model, reward, x1, sigmas, t=T - 1).loss.backward()
    torch.testing.assert_close(a, grads(model), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="n >= 0"):
        DRaFTLV(n=-1).draw(T, torch.Generator(), x1)


@pytest.mark.parametrize("t,train", [(T - 1, [1, 4]), (T - 2, [0, 5]), (T - 4, [2])])
def test_drtune(t, train):
    model, sigmas, x1 = setup()
    out = DRTune(lam=LAM).loss(model, reward, x1, sigmas, t=t, train=train)
    out.loss.backward()
    got = grads(model)
    states = no_grad_states(model, x1, sigmas, t)
    with torch.no_grad():
        xhat0 = states[t] - sigmas[t] * model(states[t], sigmas[t])
    g = dloss_dx(xhat0)
    # xhat0 = x_t - s_t v_t with x_{i+1} = x_i + (s_{i+1} - s_i) v(sg(x_i)): each trained step
    # contributes its own coefficient times its VJP, nothing flows through model inputs
    want = torch.zeros_like(got)
    for i in train:
        coef = -sigmas[t] if i == t else sigmas[i + 1] - sigmas[i]
        want += vjp(model, states[i], sigmas[i], coef * g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_drtune_draw_is_evenly_spaced_and_inside_the_prefix():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        c = DRTune(K=3, last_m=11).draw(25, g, torch.zeros(1))
        t, train = c["t"], c["train"]
        assert 14 <= t <= 24 and len(train) == 3 and all(0 <= i <= t for i in train)
        assert train[1] - train[0] == train[2] - train[1] > 0


def test_full_backprop_checkpointed_equals_unrolled():
    model, sigmas, x1 = setup()
    FullBackprop(lam=LAM, checkpointing=True).loss(model, reward, x1, sigmas).loss.backward()
    got = grads(model).clone()
    model.zero_grad()
    FullBackprop(lam=LAM, checkpointing=False).loss(model, reward, x1, sigmas).loss.backward()
    torch.testing.assert_close(got, grads(model), rtol=1e-12, atol=1e-14)


def test_full_backprop_against_finite_differences():
    model, sigmas, x1 = setup()
    FullBackprop(lam=LAM).loss(model, reward, x1, sigmas).loss.backward()
    got = model.b.grad.clone()
    h = 1e-6
    for idx in range(D):
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                model.b[idx] += sign * h
                vals.append(FullBackprop(lam=LAM).loss(model, reward, x1, sigmas).loss.item())
                model.b[idx] -= sign * h
        assert abs((vals[0] - vals[1]) / (2 * h) - got[idx].item()) < 1e-6 * max(1.0, abs(got[idx].item()))


def test_leapalign_pair_window():
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        c = LeapAlign(pair_window=5).draw(25, g, torch.zeros(1))
        assert 20 <= c["k"] < c["j"] <= 24


def test_make_method_by_name_and_errors():
    assert isinstance(make_method("drtune", K=3), DRTune)
    assert make_method("leapalign", alpha=0.1).alpha == 0.1
    with pytest.raises(ValueError, match="'nope'"):
        make_method("nope")
    with pytest.raises(ValueError, match="beta"):
        make_method("refl", beta=1)
    with pytest.raises(ValueError, match="alpha=2"):
        make_method("leapalign", alpha=2)
    with pytest.raises(ValueError, match="tau=0"):
        make_method("leapalign", tau=0)
