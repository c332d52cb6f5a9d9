"""A bound-constrained Newton method that runs under ``jit`` and ``vmap``.

Minimises f(x) subject to x ≥ lower (lower may be -inf). Each iteration uses the exact gradient
and Hessian from JAX autodiff (θ has only a handful of entries, so the Hessian is cheap):

- coordinates at their bound whose gradient pushes outward are held fixed (projected Newton,
  Bertsekas 1982); the rest take a Newton step with the Hessian's eigenvalues replaced by their
  absolute values (so saddles and concave regions are escaped, not approached);
- where the gradient vanishes but the curvature is negative (a variance at 0 that should grow),
  the step follows the most negative curvature direction into the feasible set;
- a backtracking (Armijo) line search on the projected path keeps every step a descent step.

Returns an OptResult record; a fit never produces a half-filled object.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmixed.engine import kernels


class OptResult(NamedTuple):
    x: jnp.ndarray
    fun: jnp.ndarray
    grad: jnp.ndarray
    n_iter: jnp.ndarray
    converged: jnp.ndarray  # first- and second-order conditions met
    history: jnp.ndarray  # f at iterations 0..n_iter, NaN after
    # ∇²f where ``grad`` was evaluated (the returned x unless ``final_step`` moved it): projected
    # Newton's exact Hessian, so that a caller needing ∇²f at the optimum (standard errors by
    # the chain rule) does not compile a second Hessian program; None from projected BFGS
    hessian: jnp.ndarray | None = None


def minimize_bounded(fun, x0, lower, args=(), max_iter: int = 200, gtol: float = 1e-7,
                     ftol: float = 1e-13, max_halvings: int = 50, hessian: str = "map",
                     final_step: bool = False) -> OptResult:
    """Minimise ``fun(x, *args)`` over x ≥ lower (see the module docstring).

    Each iteration first evaluates f, ∇f and ∇²f at the current point, tests convergence there,
    and only then steps; so the program holds a single copy of the Hessian computation, and the
    returned gradient and convergence flag belong to x.

    ``hessian`` picks how ∇²f is formed:

    - ``"map"`` (default): forward over reverse, the Hessian's columns in sequence
      (``lax.map``). Vmapped tangents would turn each LAPACK call into a batched one, and
      jaxlib 0.10's batched CPU kernels can wedge their thread pool (jaxmixed.engine.kernels);
      forward over forward in this form has deadlocked too (the per-panel engine; a
      20,000-group random-slope model).
    - ``"forward"``: forward over forward, all columns at once. For objectives that already
      avoid LAPACK (the "unrolled" or "xla" kernel policy of jaxmixed.engine.kernels) and run under an outer ``vmap`` (``fit_many``,
      the bootstrap): a third faster than forward over reverse for a handful of entries, the
      same matrix to rounding. The Newton step's eigen-decomposition is then Jacobi's in plain
      XLA ops (:func:`jaxmixed.engine.kernels.eigh_xla`), so that the optimiser adds no LAPACK
      call either (under ``vmap`` it would be a batched one).

    Two details make the loop safe under ``vmap``, where every lane runs until the last one
    stops: the line search is skipped once a lane has converged or spent its budget (its step
    would be discarded anyway), and a full step whose value exceeds f by no more than f's
    rounding noise, 1e-12 (1 + |f|), is accepted. Near an optimum with large curvature the
    predicted decrease can be below that noise while the gradient is still above ``gtol``; a
    strict decrease test would then reject the step that finishes, and the search would halve
    and creep (seen: 200 iterations, not converged, for one of 1,000 simulated JSP responses).

    ``final_step``: stop after the Newton step taken where the first- and second-order
    conditions already hold and the step predicts a decrease −½gᵀd ≤ ``ftol`` (1 + |f|): its full
    step is accepted, the returned x and f are that step's (the gradient and the conditions are
    those of the point it started from), and no Hessian is formed again only to see f no longer
    change. For batched programs (``fit_many``, the bootstrap), where every lane waits for the
    slowest and that confirming iteration is a fifth of a typical fit's work; ``jm.fit`` keeps the
    confirmed stop.
    """
    if hessian == "map":
        def grad_aux(x):
            f, g = jax.value_and_grad(fun)(x, *args)
            return g, (f, g)

        def evaluate(x):
            """x -> (H, (f, g)); f and g are the first column's primal outputs, so that the
            program holds one copy of the value and gradient, the one inside the jvp (a
            separate value-and-gradient pass before the columns made it a third larger and as
            much slower to compile, for the same numbers)."""
            def column(v):
                (_, fg), (hv, _) = jax.jvp(grad_aux, (x,), (v,))
                return hv, fg

            H, (f, g) = jax.lax.map(column, jnp.eye(x.shape[0], dtype=x.dtype))
            return H, (f[0], g[0])
    elif hessian == "forward":
        def grad_fwd(x):
            g = jax.jacfwd(fun)(x, *args)
            return g, (fun(x, *args), g)

        evaluate = jax.jacfwd(grad_fwd, has_aux=True)
    else:
        raise ValueError(f"hessian must be 'map' or 'forward', not {hessian!r}")
    eigh = kernels.eigh_xla if hessian == "forward" else jnp.linalg.eigh
    bounded = jnp.isfinite(lower)

    def proj(x):
        return jnp.where(bounded, jnp.maximum(x, lower), x)

    def value(x):
        f = fun(x, *args)
        return jnp.where(jnp.isfinite(f), f, jnp.inf)

    def body(state):
        k, x, f_prev, _, _, _, history, _ = state
        H, (f, g) = evaluate(x)
        history = history.at[k].set(f)
        at_bound = bounded & (x <= lower + 1e-12)
        free = ~(at_bound & (g > 0))
        Hf = jnp.where(free[:, None] & free[None, :], H, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
        gf = jnp.where(free, g, 0.0)
        w, V = eigh(Hf)
        scale = jnp.max(jnp.abs(w))
        neg = w[0] < -1e-8 * (scale + 1.0)
        pg = jnp.max(jnp.abs(x - proj(x - g)), initial=0.0)
        first_order = pg <= gtol * (1.0 + jnp.abs(f))
        small_change = jnp.abs(f_prev - f) <= ftol * (1.0 + jnp.abs(f))
        converged = first_order & ~neg & (small_change | (pg <= 1e-10 * (1.0 + jnp.abs(f))))
        last = k + 1 >= max_iter
        searching = ~converged & ~last

        # Newton direction with |eigenvalues|, plus negative curvature into the feasible set.
        wabs = jnp.maximum(jnp.abs(w), 1e-10 * scale + 1e-14)
        d = -V @ ((V.T @ gf) / wabs)
        v = V[:, 0]
        inward = jnp.sum(jnp.where(at_bound, v, 0.0))
        s = jnp.where(jnp.abs(inward) > 1e-12, jnp.sign(inward), -jnp.sign(v @ g + 1e-300))
        d = jnp.where(free, d + jnp.where(neg, s * v, 0.0), 0.0)

        noise = 1e-12 * (1.0 + jnp.abs(f))

        def ok(j, fn, xn):
            return (fn <= f + 1e-4 * jnp.dot(g, xn - x)) | ((j == 0) & (fn <= f + noise))

        def ls_cond(ls):
            j, alpha, fn, xn = ls
            return searching & ~ok(j, fn, xn) & (j < max_halvings)

        def ls_body(ls):
            j, alpha, _, _ = ls
            xn = proj(x + 0.5 * alpha * d)
            return j + 1, 0.5 * alpha, value(xn), xn

        x1 = proj(x + d)
        j, _, f_new, x_new = jax.lax.while_loop(ls_cond, ls_body, (0, 1.0, value(x1), x1))
        improved = (j < max_halvings) & ((f_new < f) | ((j == 0) & (f_new <= f + noise)))
        move = improved & searching
        x_next = jnp.where(move, x_new, x)
        # At the optimum the Newton step may not lower f by a representable amount: the line
        # search then fails although the first- and second-order conditions hold.
        converged = converged | (~improved & first_order & ~neg)
        if final_step:
            # the last Newton step: where the conditions hold at x and the step predicts a decrease
            # below ftol, its full step is taken and the loop stops there, without evaluating the
            # Hessian once more only to see f no longer change
            final = move & (j == 0) & first_order & ~neg & (-0.5 * jnp.dot(gf, d) <= ftol * (1.0 + jnp.abs(f)))
            converged = converged | final
            f = jnp.where(final, f_new, f)
            return k + 1, x_next, f, g, converged, ~move | final, history, H
        return k + 1, x_next, f, g, converged, ~move, history, H

    n = x0.shape[0]
    history = jnp.full((max_iter,), jnp.nan)
    init = (0, proj(x0), jnp.inf, jnp.zeros(n), False, False, history, jnp.zeros((n, n), x0.dtype))
    k, x, f, g, converged, _, history, H = jax.lax.while_loop(lambda s: ~s[5], body, init)
    return OptResult(x, f, g, k - 1, converged & jnp.isfinite(f), history, H)


BOUNDARY_SNAP = 1e-5  # a bounded coordinate closer than this to its bound may be put on it


def minimize_quasi_newton(fun, x0, lower, args=(), max_iter: int = 200, gtol: float = 1e-7,
                          ftol: float = 1e-13, max_halvings: int = 30, fd_step: float = 1e-4,
                          carry=None) -> OptResult:
    """Minimise ``fun(x, *args)`` over x ≥ lower with gradients only (projected BFGS).

    ``carry``: a warm start handed from one evaluation to the next (e.g. a GLMM's conditional
    modes): then ``fun(x, carry, *args)`` returns (f, next carry), the carry not differentiated;
    the value must not depend on it beyond round-off.

    For objectives whose Hessian is costly to trace or evaluate (the blocked engine's large
    dense panels). The loop evaluates f and ∇f once per pass, at a trial point, so the program
    holds a single copy of the gradient computation:

    - the first n+1 passes evaluate ∇f at x₀ and at x₀ + hᵢeᵢ; the forward differences give a
      Hessian estimate whose |eigenvalues| start the BFGS inverse-Hessian B (the deviance's
      curvatures differ by orders of magnitude between θ entries, and a scaled identity would
      take many steps to learn them);
    - then each pass tries x + αd on the projected path (d = -B g on the free coordinates:
      those at a bound whose gradient pushes outward are held fixed) and either accepts it
      (Armijo; BFGS update of B) or backtracks (cubic interpolation of f along the step,
      using the trial's gradient; safeguarded to [α/10, α/2]);
    - steps move no coordinate by more than 1, and stop a bounded coordinate at a tenth of its
      distance to the bound until that distance is below BOUNDARY_SNAP: a variance goes to 0
      geometrically, never thrown onto the boundary, where its gradient vanishes and a gradient
      method could not tell a minimum from a saddle.

    Convergence tests as in :func:`minimize_bounded` (first order: a BFGS estimate cannot
    certify second-order conditions). Returns an OptResult; ``n_iter`` counts accepted steps.
    """
    def with_carry(x, c, *a):  # (f, the next evaluation's start), the start not differentiated
        if carry is None:
            return fun(x, *a), c
        f, c_next = fun(x, c, *a)
        return f, jax.lax.stop_gradient(c_next)

    vg_aux = jax.value_and_grad(with_carry, has_aux=True)
    bounded = jnp.isfinite(lower)
    n = x0.shape[0]
    eye = jnp.eye(n)

    def proj(x):
        return jnp.where(bounded, jnp.maximum(x, lower), x)

    def direction(x, g, B):
        at_bound = bounded & (x <= lower + 1e-12)
        free = ~(at_bound & (g > 0))
        gf = jnp.where(free, g, 0.0)
        d = -jnp.where(free[:, None] & free[None, :], B, 0.0) @ gf
        d = jnp.where(jnp.dot(d, gf) < 0, d, -gf)
        big = jnp.max(jnp.abs(d), initial=0.0)
        d = d * jnp.minimum(1.0, 1.0 / jnp.maximum(big, 1e-300))
        room = jnp.where(bounded, x - lower, jnp.inf)
        limit = jnp.where(room > BOUNDARY_SNAP, -0.9 * room, -jnp.inf)
        t = jnp.where(d < limit, limit / jnp.where(d < 0, d, -1.0), 1.0)
        return d * jnp.min(t, initial=1.0)

    def inverse_abs(H):
        H = 0.5 * (H + H.T)
        w, V = jnp.linalg.eigh(H)
        scale = jnp.max(jnp.abs(w), initial=0.0)
        w = jnp.maximum(jnp.abs(w), 1e-8 * scale + 1e-300)
        return (V / w) @ V.T

    h = fd_step * jnp.maximum(1.0, jnp.abs(proj(x0)))

    def body(s):
        ne = s["n_eval"]
        (ft, carry_t), gt = vg_aux(s["xt"], s["carry"], *args)
        ft = jnp.where(jnp.isfinite(ft), ft, jnp.inf)
        fd = ne <= n  # finite-difference phase: 0 is x₀ itself, i ≥ 1 is x₀ + hᵢ eᵢ
        # --- finite-difference phase
        x, f, g = (jnp.where(ne == 0, s["xt"], s["x"]), jnp.where(ne == 0, ft, s["f"]),
                   jnp.where(ne == 0, gt, s["g"]))
        col = jnp.clip(ne - 1, 0, n - 1)
        H = jnp.where((ne >= 1) & fd, s["H"].at[:, col].set((gt - g) / h[col]), s["H"])
        end_fd = ne == n
        B_fd = jnp.where(jnp.all(jnp.isfinite(H)), inverse_abs(H), eye)
        # --- line-search phase: accept, or backtrack to the minimiser of the cubic through
        # (0, f, g·d) and (α, f_t, g_t·d), kept within [α/10, α/2]
        accept = ~fd & (ft <= f + 1e-4 * jnp.dot(g, s["xt"] - x))
        a = s["alpha"]
        d0, d1 = jnp.dot(g, s["d"]), jnp.dot(gt, s["d"])
        th = 3.0 * (f - ft) / a + d0 + d1
        disc = th ** 2 - d0 * d1
        w = jnp.sqrt(jnp.maximum(disc, 0.0))
        a_cubic = a * (1.0 - (d1 + w - th) / (d1 - d0 + 2.0 * w))
        a_quad = -d0 * a ** 2 / (2.0 * (ft - f - d0 * a))
        a_try = jnp.where((disc >= 0) & jnp.isfinite(a_cubic) & jnp.isfinite(ft), a_cubic,
                          jnp.where(jnp.isfinite(a_quad), a_quad, 0.5 * a))
        a_back = jnp.clip(jnp.where(jnp.isfinite(a_try), a_try, 0.5 * a), 0.1 * a, 0.5 * a)
        sv, yv = s["xt"] - x, gt - g
        sy = jnp.dot(sv, yv)
        good = accept & (sy > 1e-12 * jnp.linalg.norm(sv) * jnp.linalg.norm(yv)) & jnp.all(jnp.isfinite(gt))
        rho = 1.0 / jnp.where(good, sy, 1.0)
        V = eye - rho * jnp.outer(sv, yv)
        B = jnp.where(good, V @ s["B"] @ V.T + rho * jnp.outer(sv, sv), s["B"])
        B = jnp.where(end_fd, B_fd, B)
        x_new = jnp.where(accept, s["xt"], x)
        f_new = jnp.where(accept, ft, f)
        g_new = jnp.where(accept, gt, g)
        pg = jnp.max(jnp.abs(x_new - proj(x_new - g_new)), initial=0.0)
        scale_f = 1.0 + jnp.abs(f_new)
        first_order = pg <= gtol * scale_f
        small = jnp.abs(f - ft) <= ftol * (1.0 + jnp.abs(ft))
        conv = jnp.where(accept | end_fd, first_order & (small | (pg <= 1e-10 * scale_f)), s["conv"])
        # a first-order point whose trial step changes f only at round-off level is converged
        noise = ~fd & ~accept & first_order & (jnp.abs(ft - f) <= 1e-12 * scale_f)
        halvings = jnp.where(accept | fd, 0, s["halvings"] + 1)
        stuck = ~fd & ~accept & (halvings >= max_halvings)
        conv = jnp.where(noise, True, jnp.where(stuck, pg <= 10.0 * gtol * scale_f, conv))
        stuck = stuck | noise
        k = s["k"] + jnp.where(accept, 1, 0)
        history = jnp.where(ne == 0, s["history"].at[0].set(ft), s["history"])
        history = jnp.where(accept, history.at[jnp.minimum(k, max_iter - 1)].set(ft), history)
        # --- next trial point
        new_dir = accept | end_fd
        d = jnp.where(new_dir, direction(x_new, g_new, B), s["d"])
        alpha = jnp.where(new_dir, 1.0, a_back)
        nxt_fd = proj(x0) + jnp.where(jnp.arange(n) == ne, h, 0.0)  # next FD point (ne < n)
        xt = jnp.where(fd & (ne < n), nxt_fd, proj(x_new + alpha * d))
        done = conv | (k >= max_iter) | stuck | ~jnp.isfinite(f_new)
        return dict(n_eval=ne + 1, k=k, x=x_new, f=f_new, g=g_new, B=B, H=H, d=d, alpha=alpha, xt=xt,
                    halvings=halvings, history=history, done=done, conv=conv, carry=carry_t)

    x0p = proj(x0)
    init = dict(n_eval=0, k=0, x=x0p, f=jnp.asarray(jnp.inf, x0.dtype), g=jnp.zeros(n), B=eye,
                H=jnp.zeros((n, n)), d=jnp.zeros(n), alpha=jnp.asarray(1.0, x0.dtype), xt=x0p, halvings=0,
                history=jnp.full((max_iter,), jnp.nan), done=False, conv=False,
                carry=() if carry is None else carry)
    out = jax.lax.while_loop(lambda s: ~s["done"], body, init)
    return OptResult(out["x"], out["f"], out["g"], out["k"], out["conv"] & jnp.isfinite(out["f"]),
                     out["history"])


def minimize_scaled(fun, x0, lower, unit, args=(), *, quasi_newton: bool = False, max_iter: int = 200,
                    hessian: str = "map", carry=None, final_step: bool = False) -> OptResult:
    """Minimise ``fun(x, *args)`` over x ≥ lower working on x / ``unit`` (the optimiser's units,
    e.g. ``Design.theta_scale``: O(1) whatever the scale of the data, so that the tolerances
    mean the same everywhere). x₀, the bounds and the returned x, gradient and Hessian are in x's own
    units. Projected Newton (:func:`minimize_bounded`, ``hessian`` as there), or projected BFGS
    on exact gradients (:func:`minimize_quasi_newton`) where Hessians are costly. The one
    implementation of optimising in scaled units (jm.fit, the per-panel engine, fit_many and
    the functional core). ``carry``: a warm start passed between evaluations (projected BFGS
    only; :func:`minimize_quasi_newton`)."""
    unit = jnp.asarray(unit, dtype=x0.dtype)

    def scaled(xs, *a):
        return fun(xs * unit, *a)

    if quasi_newton:
        opt = minimize_quasi_newton(scaled, x0 / unit, lower / unit, args, max_iter=max_iter, carry=carry)
    else:
        if carry is not None:
            raise ValueError("carry= is for the quasi-Newton optimiser")
        opt = minimize_bounded(scaled, x0 / unit, lower / unit, args, max_iter=max_iter, hessian=hessian,
                               final_step=final_step)
    hess = None if opt.hessian is None else opt.hessian / (unit[:, None] * unit[None, :])
    return opt._replace(x=opt.x * unit, grad=opt.grad / unit, hessian=hess)
