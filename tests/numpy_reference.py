"""Independent NumPy float64 reference implementations of the LoRA optimizers.

Written only from docs/ALGORITHMS.md (sections "Notation and layouts", 1, 2, 3,
3b, 4), as a literal step-by-step transcription, so that tests can compare the
JAX library against it number-for-number. Nothing here is shared with the
library under test.

Conventions (all functions):
  * Factors are canonical pairs ``(A, B)`` with ``A: (m, r)`` the input-side
    factor and ``B: (n, r)`` the output-side factor; the adapter's weight
    change is ``s * A @ B.T`` of shape ``(m, n)``.
  * ``pairs0`` is a list of ``(A, B)`` float64 arrays (copied, never mutated).
  * ``grad_fn(pairs) -> [(G_A, G_B), ...]`` returns the gradients for the
    current factors, one tuple per pair.
  * Every optimizer returns the trajectory: a list of length ``steps`` whose
    element ``t`` is the list of ``(A, B)`` pairs AFTER step ``t`` (0-based).
  * ``t`` is the 0-based step count everywhere.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bc",
    "sym",
    "rms",
    "lora_rite_reference",
    "scaled_gd_reference",
    "scaled_adamw_reference",
    "sylvester_reference",
    "lora_pro_equivalent_gradient_reference",
    "lora_pro_reference",
    "lora_plus_reference",
    "adam_reference",
]


# ---------------------------------------------------------------------------
# Shared helpers (ALGORITHMS.md, "Notation and layouts")
# ---------------------------------------------------------------------------


def sym(X):
    """sym(X) = (X + X.T) / 2."""
    return (X + X.T) / 2.0


def bc(beta, t):
    """Bias-corrected decay: bc(beta, t) = beta (1 - beta^t) / (1 - beta^(t+1)).

    bc(beta, 0) = 0, so x_t = bc x_{t-1} + (1 - bc) y_t needs no further
    bias correction.
    """
    return beta * (1.0 - beta**t) / (1.0 - beta ** (t + 1))


def rms(X):
    """Root mean square over all entries."""
    return np.sqrt(np.mean(np.square(X)))


def _as_pairs(pairs):
    return [(np.array(A, dtype=np.float64), np.array(B, dtype=np.float64)) for A, B in pairs]


def _snapshot(pairs):
    return [(A.copy(), B.copy()) for A, B in pairs]


def _grads(grad_fn, pairs):
    grads = grad_fn(_snapshot(pairs))
    assert len(grads) == len(pairs), "grad_fn must return one (G_A, G_B) per pair"
    return [(np.asarray(GA, dtype=np.float64), np.asarray(GB, dtype=np.float64)) for GA, GB in grads]


# ---------------------------------------------------------------------------
# 1. LoRA-RITE
# ---------------------------------------------------------------------------


def _rite_init_factor_state(rows, r):
    # State per factor: first moment M (rows, r), second moment V (r, r),
    # previous basis U_old (rows, r) (zeros at init), escape mass rho (0).
    return {
        "M": np.zeros((rows, r)),
        "V": np.zeros((r, r)),
        "U_old": np.zeros((rows, r)),
        "rho": 0.0,
    }


def lora_rite_reference(
    pairs0,
    grad_fn,
    steps,
    *,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    clip_unmagnified_grad=1.0,
    update_skipping=1.0,
    update_capping=0.0,
    weight_decay=0.0,
    escape=False,
):
    """LoRA-RITE (ALGORITHMS.md section 1), literal transcription.

    pairs0: list of (A, B) numpy float64 arrays. grad_fn(pairs) -> list of
    (G_A, G_B) for the current factors (list of same length). Runs `steps`
    steps of ALGORITHMS.md 1 and returns the trajectory: a list of length
    `steps`, element t is the list of (A, B) pairs AFTER step t (0-based).

    Per-factor state: M (rows, r), V (r, r), U_old (rows, r), rho (scalar).
    `clip_unmagnified_grad`, `update_skipping`, `update_capping`: 0 disables.
    """
    pairs = _as_pairs(pairs0)
    # state[i] = (state of A_i, state of B_i)
    state = [
        (_rite_init_factor_state(A.shape[0], A.shape[1]), _rite_init_factor_state(B.shape[0], B.shape[1]))
        for A, B in pairs
    ]
    traj = []
    for t in range(steps):
        grads = _grads(grad_fn, pairs)
        bc1 = bc(b1, t)
        bc2 = bc(b2, t)

        # --- Steps 1-4, per pair -------------------------------------------
        per_pair = []
        for (A, B), (GA, GB) in zip(pairs, grads):
            # Step 1: non-finite gradient entries become NaN.
            GA = np.where(np.isfinite(GA), GA, np.nan)
            GB = np.where(np.isfinite(GB), GB, np.nan)

            # Step 2: thin QR of each factor, A = U_A R_A, B = U_B R_B.
            U_A, R_A = np.linalg.qr(A, mode="reduced")
            U_B, R_B = np.linalg.qr(B, mode="reduced")

            # Step 3: unmagnified gradients, each expressed in the orthonormal
            # basis of the *other* factor. A zero factor gives a zero pinv.
            RA_pinv = np.linalg.pinv(R_A)
            RB_pinv = np.linalg.pinv(R_B)
            Gbar_A = GA @ RB_pinv
            Gbar_B = GB @ RA_pinv

            # Step 4: update skipping, per factor (0 disables). A NaN rms
            # compares False, so a NaN gradient is not skipped here.
            if update_skipping > 0:
                if rms(Gbar_A) > update_skipping:
                    Gbar_A = np.zeros_like(Gbar_A)
                if rms(Gbar_B) > update_skipping:
                    Gbar_B = np.zeros_like(Gbar_B)

            per_pair.append(
                {"U_A": U_A, "U_B": U_B, "RA_pinv": RA_pinv, "RB_pinv": RB_pinv, "Gbar_A": Gbar_A, "Gbar_B": Gbar_B}
            )

        # --- Step 5: global clipping over all pairs, both factors ----------
        if clip_unmagnified_grad > 0:
            g = np.sqrt(sum(np.sum(d["Gbar_A"] ** 2) + np.sum(d["Gbar_B"] ** 2) for d in per_pair))
            if g > clip_unmagnified_grad:  # NaN g compares False: no clipping
                for d in per_pair:
                    d["Gbar_A"] = d["Gbar_A"] * (clip_unmagnified_grad / g)
                    d["Gbar_B"] = d["Gbar_B"] * (clip_unmagnified_grad / g)

        # --- Steps 6-14, per pair, per factor --------------------------------
        new_pairs = []
        new_state = []
        for (A, B), (stA, stB), d in zip(pairs, state, per_pair):
            U_A, U_B = d["U_A"], d["U_B"]

            # Step 6: basis transport. A's gradient lives in B's basis, so A's
            # moments are transported with P_A = U_B.T @ U_B_old, and B's with
            # P_B = U_A.T @ U_A_old.
            P_A = U_B.T @ stB["U_old"]
            P_B = U_A.T @ stA["U_old"]

            D_A, nstA = _rite_factor_update(
                X=A, Gbar=d["Gbar_A"], P=P_A, st=stA, other_R_pinv=d["RB_pinv"], t=t,
                bc1=bc1, bc2=bc2, eps=eps, update_capping=update_capping,
                weight_decay=weight_decay, escape=escape,
            )
            D_B, nstB = _rite_factor_update(
                X=B, Gbar=d["Gbar_B"], P=P_B, st=stB, other_R_pinv=d["RA_pinv"], t=t,
                bc1=bc1, bc2=bc2, eps=eps, update_capping=update_capping,
                weight_decay=weight_decay, escape=escape,
            )

            # Step 14: update -lr * D; store U_A_old = U_A, U_B_old = U_B.
            nstA["U_old"] = U_A
            nstB["U_old"] = U_B
            new_pairs.append((A - lr * D_A, B - lr * D_B))
            new_state.append((nstA, nstB))

        pairs = new_pairs
        state = new_state
        traj.append(_snapshot(pairs))
    return traj


def _rite_factor_update(*, X, Gbar, P, st, other_R_pinv, t, bc1, bc2, eps, update_capping, weight_decay, escape):
    """LoRA-RITE steps 6 (second half) to 13 for one factor X (A or B).

    Gbar: X's unmagnified gradient after steps 4-5, shape (rows_X, r).
    P: X's transport matrix from step 6 (P_A for A, P_B for B).
    other_R_pinv: pinv of the other factor's R (R_B^+ for A, R_A^+ for B).
    Returns (D, new_state) where D is the direction before -lr (step 14);
    new_state["U_old"] is set by the caller.
    """
    V_old, M_old, rho = st["V"], st["M"], st["rho"]
    rows = X.shape[0]

    # Step 6 (cont.): V' = sym(P V P.T) with non-finite entries -> 0;
    # M' = M P.T.
    V_tr = sym(P @ V_old @ P.T)
    V_tr = np.where(np.isfinite(V_tr), V_tr, 0.0)
    M_tr = M_old @ P.T

    # Step 7: escape mass. Eigenvalues sorted ascending (np.linalg.eigvalsh
    # returns them ascending); V_old is V before transport, V_tr after.
    if escape:
        ev_old = np.sort(_eigvalsh_or_nan(V_old))
        ev_new = np.sort(_eigvalsh_or_nan(V_tr))
        e = max(0.0, min(np.max(ev_old - ev_new), np.trace(V_old) - np.trace(V_tr)))
        rho = bc2 * (rho + e)
    else:
        rho = 0.0

    # Step 8: second moment. S = Gbar.T Gbar / rows;
    # V = sym(bc(b2, t) V' + (1 - bc(b2, t)) S).
    S = Gbar.T @ Gbar / rows
    V = sym(bc2 * V_tr + (1.0 - bc2) * S)

    # Step 9: preconditioning. V = Q diag(w) Q.T;
    # Vis = sym(Q diag(1 / (sqrt(w + rho) + eps)) Q.T); Gpre = nan_to_zero(Gbar Vis).
    # V is PSD in exact arithmetic; eigh can return tiny negative eigenvalues
    # from rounding, so w is clipped to >= 0 before the sqrt (rounding only).
    if np.all(np.isfinite(V)):
        w, Q = np.linalg.eigh(V)
        w = np.maximum(w, 0.0)
        Vis = sym(Q @ np.diag(1.0 / (np.sqrt(w + rho) + eps)) @ Q.T)
    else:
        # A non-finite V (from a NaN gradient) has no eigendecomposition;
        # treat it as all-NaN, so Gpre below becomes 0 after nan_to_zero.
        Vis = np.full_like(V, np.nan)
    Gpre = Gbar @ Vis
    Gpre = np.where(np.isnan(Gpre), 0.0, Gpre)  # nan_to_zero

    # Step 10: first moment. M = bc(b1, t) M' + (1 - bc(b1, t)) Gpre.
    M = bc1 * M_tr + (1.0 - bc1) * Gpre

    # Step 11: update capping (0 disables). D = M / max(1, rms(M) / cap).
    if update_capping > 0:
        D = M / max(1.0, rms(M) / update_capping)
    else:
        D = M

    # Step 12: back to factor coordinates, D = D (R_other^+).T.
    D = D @ other_R_pinv.T

    # Step 13: weight decay, D = D + weight_decay * X.
    D = D + weight_decay * X

    return D, {"M": M, "V": V, "U_old": None, "rho": rho}


def _eigvalsh_or_nan(V):
    if np.all(np.isfinite(V)):
        return np.linalg.eigvalsh(V)
    return np.full(V.shape[0], np.nan)


# ---------------------------------------------------------------------------
# 2. Riemannian preconditioned LoRA (scaled GD / scaled AdamW)
# ---------------------------------------------------------------------------


def _scaled_grad(G, other, reg):
    """Gs_X = G_X @ inv(Other.T @ Other + reg I)."""
    r = other.shape[1]
    return G @ np.linalg.inv(other.T @ other + reg * np.eye(r))


def scaled_gd_reference(pairs0, grad_fn, steps, *, lr, reg=1e-6, weight_decay=0.0):
    """Scaled GD (ALGORITHMS.md section 2).

    Gs_A = G_A inv(B.T B + reg I), Gs_B = G_B inv(A.T A + reg I), both from the
    pre-update factors; update -lr * (Gs + weight_decay * X).
    """
    pairs = _as_pairs(pairs0)
    traj = []
    for _t in range(steps):
        grads = _grads(grad_fn, pairs)
        new_pairs = []
        for (A, B), (GA, GB) in zip(pairs, grads):
            GsA = _scaled_grad(GA, B, reg)
            GsB = _scaled_grad(GB, A, reg)
            new_pairs.append((A - lr * (GsA + weight_decay * A), B - lr * (GsB + weight_decay * B)))
        pairs = new_pairs
        traj.append(_snapshot(pairs))
    return traj


def scaled_adamw_reference(
    pairs0,
    grad_fn,
    steps,
    *,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    reg=1e-6,
    weight_decay=0.0,
    correct_bias=False,
    sequential=False,
):
    """Scaled AdamW (ALGORITHMS.md section 2).

    Per factor, elementwise Adam on the scaled gradient Gs:
      m = b1 m + (1 - b1) Gs;  v = b2 v + (1 - b2) Gs^2;
      (correct_bias: m /= 1 - b1^(t+1), v /= 1 - b2^(t+1))
      update = -lr * (m / (sqrt(v) + eps) + weight_decay * X)  (decoupled).
    sequential=True: B's preconditioner inv(A.T A + reg I) uses A after A's
    update in the same step; G_B is still the gradient from the start of the
    step (only the preconditioner changes).
    """
    pairs = _as_pairs(pairs0)
    mom = [
        {"mA": np.zeros_like(A), "vA": np.zeros_like(A), "mB": np.zeros_like(B), "vB": np.zeros_like(B)}
        for A, B in pairs
    ]

    def adam_dir(m, v, t):
        if correct_bias:
            m = m / (1.0 - b1 ** (t + 1))
            v = v / (1.0 - b2 ** (t + 1))
        return m / (np.sqrt(v) + eps)

    traj = []
    for t in range(steps):
        grads = _grads(grad_fn, pairs)
        new_pairs = []
        for (A, B), (GA, GB), st in zip(pairs, grads, mom):
            # A: preconditioned by the current B.
            GsA = _scaled_grad(GA, B, reg)
            st["mA"] = b1 * st["mA"] + (1.0 - b1) * GsA
            st["vA"] = b2 * st["vA"] + (1.0 - b2) * GsA**2
            A_new = A - lr * (adam_dir(st["mA"], st["vA"], t) + weight_decay * A)

            # B: preconditioned by A (pre-update), or by A_new if sequential.
            GsB = _scaled_grad(GB, A_new if sequential else A, reg)
            st["mB"] = b1 * st["mB"] + (1.0 - b1) * GsB
            st["vB"] = b2 * st["vB"] + (1.0 - b2) * GsB**2
            B_new = B - lr * (adam_dir(st["mB"], st["vB"], t) + weight_decay * B)

            new_pairs.append((A_new, B_new))
        pairs = new_pairs
        traj.append(_snapshot(pairs))
    return traj


# ---------------------------------------------------------------------------
# 3. LoRA-Pro (full mode) and 3b (memory-efficient mode)
# ---------------------------------------------------------------------------


def sylvester_reference(P, Q, C):
    """Solve P X + X Q = C for X by a dense Kronecker solve.

    With column-major vec: vec(P X) = (I kron P) vec(X) and
    vec(X Q) = (Q.T kron I) vec(X), so (I kron P + Q.T kron I) vec(X) = vec(C).
    P: (p, p), Q: (q, q), C: (p, q). Raises LinAlgError if singular.
    """
    P = np.asarray(P, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    p, q = C.shape
    K = np.kron(np.eye(q), P) + np.kron(Q.T, np.eye(p))
    x = np.linalg.solve(K, C.reshape(-1, order="F"))
    return x.reshape((p, q), order="F")


def _pro_grams(A, B, delta):
    """Ga = pinv(A.T A + delta I), Gb = pinv(B.T B + delta I), Pb = I - B Gb B.T."""
    r = A.shape[1]
    Ga = np.linalg.pinv(A.T @ A + delta * np.eye(r))
    Gb = np.linalg.pinv(B.T @ B + delta * np.eye(r))
    Pb = np.eye(B.shape[0]) - B @ Gb @ B.T
    return Ga, Gb, Pb


def lora_pro_equivalent_gradient_reference(A, B, G_A, G_B, scale, t, delta=1e-8):
    """Step 1 of ALGORITHMS.md section 3: the adjusted gradients (gA, gB).

      t = 0: gA = G_A,             gB = (1/s^2) G_B Ga
      t > 0: gA = (1/s^2) G_A Gb,  gB = (1/s^2) Pb G_B Ga
    The equivalent gradient (step 2) is s (gA B.T + A gB.T).
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    G_A = np.asarray(G_A, dtype=np.float64)
    G_B = np.asarray(G_B, dtype=np.float64)
    s2 = scale**2
    Ga, Gb, Pb = _pro_grams(A, B, delta)
    if t == 0:
        gA = G_A
        gB = (1.0 / s2) * G_B @ Ga
    else:
        gA = (1.0 / s2) * G_A @ Gb
        gB = (1.0 / s2) * Pb @ G_B @ Ga
    return gA, gB


def lora_pro_reference(
    pairs0,
    grad_fn,
    steps,
    *,
    lr,
    scale,
    mode="full",
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    delta=1e-8,
    jitter=1e-6,
):
    """LoRA-Pro (ALGORITHMS.md section 3, mode="full"; section 3b, mode="efficient").

    A (m, r) is the input-side factor, B (n, r) the output-side factor (zero
    at init); the weight change is scale * A @ B.T, shape (m, n).

    mode="full": Adam's moments Mf, Vf are kept in the full weight space,
    shape (m, n) per pair, so this mode gives up LoRA's memory saving for
    fidelity to full fine-tuning. Uses `delta`.
    mode="efficient": Adam's moments stay on the factors (Adam-sized state).
    Uses `jitter`.
    """
    if mode not in ("full", "efficient"):
        raise ValueError(f"unknown mode {mode!r}")
    pairs = _as_pairs(pairs0)
    s = float(scale)
    s2 = s * s
    if mode == "full":
        state = [{"Mf": np.zeros((A.shape[0], B.shape[0])), "Vf": np.zeros((A.shape[0], B.shape[0]))} for A, B in pairs]
    else:
        state = [
            {"mA": np.zeros_like(A), "vA": np.zeros_like(A), "mB": np.zeros_like(B), "vB": np.zeros_like(B)}
            for A, B in pairs
        ]

    traj = []
    for t in range(steps):
        grads = _grads(grad_fn, pairs)
        new_pairs = []
        for (A, B), (GA, GB), st in zip(pairs, grads, state):
            if mode == "full":
                gA, gB = _lora_pro_full_step(A, B, GA, GB, st, t, s=s, s2=s2, b1=b1, b2=b2, eps=eps, delta=delta)
            else:
                gA, gB = _lora_pro_efficient_step(A, B, GA, GB, st, t, s2=s2, b1=b1, b2=b2, eps=eps, jitter=jitter)
            new_pairs.append((A - lr * gA, B - lr * gB))
        pairs = new_pairs
        traj.append(_snapshot(pairs))
    return traj


def _lora_pro_full_step(A, B, GA, GB, st, t, *, s, s2, b1, b2, eps, delta):
    """Section 3, steps 1-5 for one pair; returns (gA, gB) for step 6."""
    Ga, Gb, Pb = _pro_grams(A, B, delta)

    # Step 1: adjust the raw gradients.
    gA, gB = lora_pro_equivalent_gradient_reference(A, B, GA, GB, s, t, delta=delta)

    # Step 2: equivalent gradient E = s (gA B.T + A gB.T), (m, n).
    E = s * (gA @ B.T + A @ gB.T)

    # Step 3: full-space Adam with bias correction.
    st["Mf"] = b1 * st["Mf"] + (1.0 - b1) * E
    st["Vf"] = b2 * st["Vf"] + (1.0 - b2) * E**2
    F = (st["Mf"] / (1.0 - b1 ** (t + 1))) / (np.sqrt(st["Vf"] / (1.0 - b2 ** (t + 1))) + eps)

    # Step 4: back to the factors.
    H_A = s * F @ B
    H_B = s * F.T @ A

    # Step 5: adjust again.
    if t == 0:
        gA = H_A
        gB = (1.0 / s2) * H_B @ Ga
    else:
        # (B.T B) X + X (A.T A) = -(1/s^2) Gb H_A.T A
        X = sylvester_reference(B.T @ B, A.T @ A, -(1.0 / s2) * Gb @ H_A.T @ A)
        gA = (1.0 / s2) * H_A @ Gb + A @ X.T
        gB = (1.0 / s2) * Pb @ H_B @ Ga - B @ X
    # Step 6 (caller): -lr * gA, -lr * gB.
    return gA, gB


def _lora_pro_efficient_step(A, B, GA, GB, st, t, *, s2, b1, b2, eps, jitter):
    """Section 3b, steps 1-3 for one pair (no special first step)."""
    r = A.shape[1]
    SA = A.T @ A + jitter * np.eye(r)
    SB = B.T @ B + jitter * np.eye(r)
    SA_inv = np.linalg.inv(SA)
    SB_inv = np.linalg.inv(SB)

    # Step 1: SB X + X SA = -(1/s^2) inv(SB) G_A.T A.
    X = sylvester_reference(SB, SA, -(1.0 / s2) * SB_inv @ GA.T @ A)

    # Step 2: adjusted gradients.
    gA = (1.0 / s2) * GA @ SB_inv + A @ X.T
    gB = (1.0 / s2) * (np.eye(B.shape[0]) - B @ SB_inv @ B.T) @ GB @ SA_inv - B @ X

    # Step 3: Adam with bias correction on gA and gB separately; caller
    # applies -lr times the result.
    c1 = 1.0 - b1 ** (t + 1)
    c2 = 1.0 - b2 ** (t + 1)
    st["mA"] = b1 * st["mA"] + (1.0 - b1) * gA
    st["vA"] = b2 * st["vA"] + (1.0 - b2) * gA**2
    st["mB"] = b1 * st["mB"] + (1.0 - b1) * gB
    st["vB"] = b2 * st["vB"] + (1.0 - b2) * gB**2
    dA = (st["mA"] / c1) / (np.sqrt(st["vA"] / c2) + eps)
    dB = (st["mB"] / c1) / (np.sqrt(st["vB"] / c2) + eps)
    return dA, dB


# ---------------------------------------------------------------------------
# 4. LoRA+ and plain Adam (optax conventions)
# ---------------------------------------------------------------------------


def _adam_direction(m, v, g, t, b1, b2, eps):
    """optax.scale_by_adam (eps_root = 0); returns (new m, new v, direction).

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    direction = (m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1))) + eps).
    """
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g**2
    m_hat = m / (1.0 - b1 ** (t + 1))
    v_hat = v / (1.0 - b2 ** (t + 1))
    return m, v, m_hat / (np.sqrt(v_hat) + eps)


def lora_plus_reference(pairs0, grad_fn, steps, *, lr, lr_ratio=16.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    """LoRA+ (ALGORITHMS.md section 4): Adam(W) with the B-side (output-side,
    zero-init) factor's learning rate multiplied by lr_ratio.

    update_X = -lr_X * (adam_dir_X + weight_decay * X), lr_A = lr,
    lr_B = lr * lr_ratio (optax.adamw's decoupled weight decay).
    """
    pairs = _as_pairs(pairs0)
    mom = [
        {"mA": np.zeros_like(A), "vA": np.zeros_like(A), "mB": np.zeros_like(B), "vB": np.zeros_like(B)}
        for A, B in pairs
    ]
    lr_A = lr
    lr_B = lr * lr_ratio
    traj = []
    for t in range(steps):
        grads = _grads(grad_fn, pairs)
        new_pairs = []
        for (A, B), (GA, GB), st in zip(pairs, grads, mom):
            st["mA"], st["vA"], dA = _adam_direction(st["mA"], st["vA"], GA, t, b1, b2, eps)
            st["mB"], st["vB"], dB = _adam_direction(st["mB"], st["vB"], GB, t, b1, b2, eps)
            new_pairs.append((A - lr_A * (dA + weight_decay * A), B - lr_B * (dB + weight_decay * B)))
        pairs = new_pairs
        traj.append(_snapshot(pairs))
    return traj


def adam_reference(pairs0, grad_fn, steps, *, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Plain Adam with optax.adam conventions on both factors."""
    return lora_plus_reference(pairs0, grad_fn, steps, lr=lr, lr_ratio=1.0, b1=b1, b2=b2, eps=eps, weight_decay=0.0)
