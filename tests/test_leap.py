"""The LeapAlign estimator against method.md's closed-form gradient, on a small analytic model."""
import pytest
import torch
from torch.autograd.functional import jacobian

from engine.leap import leap_connect, leapalign
from engine.schedule import euler_step, flux_sigmas

D = 3


class TinyField(torch.nn.Module):
    """v(x, s) = tanh(x W + s b) + 0.5 x: small enough for full Jacobians, nonlinear in x and theta."""

    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(0.6 * torch.randn(D, D, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(D, generator=g, dtype=dtype))
        self.calls = 0
        self.graph_calls = 0

    def forward(self, x, s):
        self.calls += 1
        self.graph_calls += int(torch.is_grad_enabled())
        return torch.tanh(x @ self.W + s.to(x.dtype) * self.b) + 0.5 * x

    def theta(self):
        return torch.cat([self.W.flatten(), self.b])

    def v_theta(self, theta, x, s):
        W, b = theta[: D * D].view(D, D), theta[D * D:]
        return torch.tanh(x @ W + s.to(x.dtype) * b) + 0.5 * x


TARGET = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)


def reward(x0):
    return (-((x0 - TARGET) ** 2) + 0.1 * torch.sin(x0)).flatten(1).sum(-1)


def rollout(model, x, sigmas):
    states = [x]
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            x = euler_step(x, model(x, sigmas[i]), sigmas[i], sigmas[i + 1])
            states.append(x)
    return states


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("k,j", [(1, 4), (0, 5), (3, 4)])
def test_gradient_equals_closed_form(alpha, k, j):
    T, B, lam, tau = 6, 2, 2.0, 0.1
    model = TinyField()
    sigmas = flux_sigmas(T, 256).double()
    x1 = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = leapalign(model, reward, x1, sigmas, k, j, alpha=alpha, lam=lam, tau=tau)
    out.loss.backward()
    got = torch.cat([model.W.grad.flatten(), model.b.grad])

    # closed form (method.md): dx0/dtheta = -j Jv_j - (k-j) Jv_k + alpha j (k-j) dv/dx(x_j) Jv_k
    states = rollout(model, x1, sigmas)
    sk, sj = sigmas[k], sigmas[j]
    theta = model.theta().detach()
    want = torch.zeros_like(theta)
    for b in range(B):
        xk, xj, x0 = states[k][b], states[j][b], states[T][b]
        Jk = jacobian(lambda th: model.v_theta(th, xk, sk), theta)            # (D, P)
        Jj = jacobian(lambda th: model.v_theta(th, xj, sj), theta)
        Jx = jacobian(lambda x: model.v_theta(theta, x, sj), xj)              # (D, D)
        dx0 = -sj * Jj - (sk - sj) * Jk + alpha * sj * (sk - sj) * (Jx @ Jk)
        xhat_j = xk - (sk - sj) * model.v_theta(theta, xk, sk)
        xhat_0 = xj - sj * model.v_theta(theta, xj, sj)
        d_j = (xj - xhat_j).abs().mean()
        d_0 = (x0 - xhat_0).abs().mean()
        w = 1.0 / (d_j.clamp_min(tau) + d_0.clamp_min(tau))
        dr = jacobian(lambda x: reward(x.unsqueeze(0))[0], x0)
        active = float(lam - reward(x0.unsqueeze(0)).item() > 0)
        want += -(active * w / B) * (dr @ dx0)
        torch.testing.assert_close(out.metrics["d_j"][b], d_j, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.metrics["d_0"][b], d_0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_alpha_only_scales_the_nested_term():
    """grad(alpha) is affine in alpha: g(0.3) = 0.7 g(0) + 0.3 g(1)."""
    sigmas = flux_sigmas(5, 256).double()
    x1 = torch.randn(2, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = {}
    for a in (0.0, 0.3, 1.0):
        m = TinyField()
        leapalign(m, reward, x1, sigmas, 1, 3, alpha=a, lam=2.0).loss.backward()
        grads[a] = torch.cat([m.W.grad.flatten(), m.b.grad])
    torch.testing.assert_close(grads[0.3], 0.7 * grads[0.0] + 0.3 * grads[1.0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grads[0.0], grads[1.0])


def test_connectors_are_the_real_latents_bit_for_bit():
    T, k, j = 8, 2, 5
    model = TinyField(dtype=torch.float32)
    sigmas = flux_sigmas(T, 1024)
    x1 = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    seen = {}

    def spy_reward(x0):
        seen["x0_conn"] = x0.detach().clone()
        return reward(x0.double()).float()

    orig = model.forward
    inputs = []

    def spy_forward(x, s):
        inputs.append(x.detach().clone())
        return orig(x, s)

    model.forward = spy_forward
    out = leapalign(model, spy_reward, x1, sigmas, k, j, alpha=0.3)
    states = rollout(TinyField(dtype=torch.float32), x1, sigmas)
    assert torch.equal(inputs[j], states[j])            # model input at j is the real x_j
    assert torch.equal(seen["x0_conn"], states[T])      # reward sees the real x_0
    assert torch.equal(out.x0, states[T])               # the rollout itself is unchanged


def test_connect_values_and_grads():
    x_start, v, x_real = torch.randn(2, 7), torch.randn(2, 7, requires_grad=True), torch.randn(2, 7)
    conn, inp, dist = leap_connect(x_start, v, x_real, 0.4, alpha=0.25)
    assert torch.equal(conn, x_real) and torch.equal(inp, x_real)
    assert dist.dtype == torch.float64 and not dist.requires_grad
    torch.testing.assert_close(dist, (x_real - (x_start - 0.4 * v)).double().abs().mean(1))
    g1, g2 = torch.randn(2, 7), torch.randn(2, 7)
    (gv,) = torch.autograd.grad((conn * g1).sum() + (inp * g2).sum(), v)
    torch.testing.assert_close(gv, -0.4 * (g1 + 0.25 * g2))


def test_exactly_T_model_calls_two_with_graph():
    for T in (5, 25):
        model = TinyField()
        out = leapalign(model, reward, torch.randn(2, D, dtype=torch.float64), flux_sigmas(T, 256).double(), 1, 3)
        assert model.calls == T == out.model_calls
        assert model.graph_calls == 2


def saved_bytes(fn):
    seen, total = set(), [0]

    def pack(t):
        # count what each saved tensor spans (a view of the sigma schedule must not count the
        # whole schedule), each region once
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_saved_bytes_do_not_grow_with_T():
    x1 = torch.randn(4, 16, D, dtype=torch.float64)
    by_T = {}
    for T in (5, 25):
        model = TinyField()
        sig = flux_sigmas(T, 256).double()
        by_T[T] = saved_bytes(lambda: leapalign(model, reward, x1, sig, 1, 3))
    assert by_T[5] > 0
    assert by_T[5] == by_T[25]


def test_same_seed_same_result():
    from engine.methods import LeapAlign

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        model = TinyField()
        x1 = torch.randn(2, D, generator=g, dtype=torch.float64)
        m = LeapAlign(alpha=0.3, lam=2.0)
        choice = m.draw(10, g, x1)
        out = m.loss(model, reward, x1, flux_sigmas(10, 256).double(), **choice)
        out.loss.backward()
        return choice, out.loss.detach(), model.W.grad.clone()

    a, b, c = run(7), run(7), run(8)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert (a[0], a[1]) != (c[0], c[1]) or not torch.equal(a[2], c[2])


@pytest.mark.parametrize("kw,match", [
    (dict(k=3, j=3), "k=3, j=3"), (dict(k=4, j=2), "k=4, j=2"),
    (dict(alpha=1.5), "alpha=1.5"), (dict(alpha=-0.1), "alpha=-0.1"),
    (dict(tau=0.0), "tau=0.0"), (dict(tau=-1.0), "tau=-1.0"),
])
def test_bad_hyperparameters(kw, match):
    args = dict(k=1, j=3, alpha=0.3, tau=0.1)
    args.update(kw)
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        leapalign(TinyField(), reward, torch.randn(2, D, dtype=torch.float64), flux_sigmas(5, 256).double(), **args)
