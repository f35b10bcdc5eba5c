//! PPO's arithmetic as pure functions on slices: advantages (GAE), whitening, the KL
//! estimator, the leave-one-out baseline, the clipped losses and the critic's explained variance.

/// Added to the variance before the square root when whitening.
pub const WHITEN_EPS: f32 = 1e-8;

/// Generalized advantage estimation over one trajectory of T tokens: δ_t = r_t + γ·V_{t+1} − V_t
/// with V_T = 0 (nothing follows the last token), A_t = δ_t + γλ·A_{t+1}; returns A_t + V_t
/// (the critic's targets). Returns (advantages, returns).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lam: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(rewards.len(), values.len(), "gae: one value per reward");
    let t = rewards.len();
    let mut adv = vec![0f32; t];
    let mut next_adv = 0f32;
    let mut next_v = 0f32;
    for i in (0..t).rev() {
        let delta = rewards[i] + gamma * next_v - values[i];
        next_adv = delta + gamma * lam * next_adv;
        adv[i] = next_adv;
        next_v = values[i];
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Mean and population variance, in f64.
fn mean_var(x: &[f32]) -> (f64, f64) {
    if x.is_empty() {
        return (0.0, 0.0);
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var)
}

/// (x − mean) / sqrt(var + 1e-8) with the population variance; `keep_mean` adds the mean back
/// (whitening the scale only).
pub fn whiten(x: &[f32], keep_mean: bool) -> Vec<f32> {
    let (mean, var) = mean_var(x);
    let inv = 1.0 / (var + WHITEN_EPS as f64).sqrt();
    x.iter()
        .map(|&v| {
            let w = (v as f64 - mean) * inv;
            (if keep_mean { w + mean } else { w }) as f32
        })
        .collect()
}

/// The per-token KL estimator log π_θ(y_t) − log π_0(y_t) (its expectation under π_θ is the KL;
/// summed over a response it is the sequence's log-ratio).
pub fn kl_per_token(logp_policy: &[f32], logp_ref: &[f32]) -> Vec<f32> {
    assert_eq!(logp_policy.len(), logp_ref.len(), "kl: same lengths");
    logp_policy
        .iter()
        .zip(logp_ref)
        .map(|(a, b)| a - b)
        .collect()
}

/// Subtracts from each reward the mean reward of the other answers to the same prompt (`prompt`
/// gives each answer's prompt; answers to one prompt are adjacent). Answers alone with their
/// prompt keep their reward.
pub fn leave_one_out(rewards: &mut [f32], prompt: &[usize]) {
    let mut i = 0;
    while i < rewards.len() {
        let mut j = i;
        while j < rewards.len() && prompt[j] == prompt[i] {
            j += 1;
        }
        let k = j - i;
        if k > 1 {
            let sum: f32 = rewards[i..j].iter().sum();
            for r in &mut rewards[i..j] {
                *r -= (sum - *r) / (k - 1) as f32;
            }
        }
        i = j;
    }
}

/// PPO's clipped surrogate for one token, as a loss to minimise:
/// L = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) with ρ = exp(logp − logp_old). Returns (L, dL/dlogp,
/// clipped): when the clipped term is the larger one (ρ > 1 + ε with A > 0, or ρ < 1 − ε with
/// A < 0) the gradient is 0 and `clipped` is true; otherwise dL/dlogp = −A·ρ.
pub fn clipped_surrogate(ratio: f32, adv: f32, eps: f32) -> (f32, f32, bool) {
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps);
    if clipped > unclipped {
        (clipped, 0.0, true)
    } else {
        (unclipped, -adv * ratio, false)
    }
}

/// The clipped value loss for one token: L = ½·max((v − R)², (v_c − R)²) with
/// v_c = v_old + clip(v − v_old, −ε, ε). Returns (L, dL/dv); the clipped branch has no gradient
/// where the clip is active.
pub fn clipped_value_loss(v: f32, v_old: f32, ret: f32, eps: f32) -> (f32, f32) {
    let d = v - v_old;
    let vc = v_old + d.clamp(-eps, eps);
    let (l1, l2) = ((v - ret).powi(2), (vc - ret).powi(2));
    if l1 >= l2 {
        (0.5 * l1, v - ret)
    } else {
        let active = d.abs() < eps;
        (0.5 * l2, if active { vc - ret } else { 0.0 })
    }
}

/// 1 − Var(returns − values) / Var(returns): how much of the return the critic explains
/// (1 perfect, 0 no better than a constant, negative worse). 0 when the returns are constant.
pub fn explained_variance(values: &[f32], returns: &[f32]) -> f32 {
    let (_, var_r) = mean_var(returns);
    if var_r <= 0.0 {
        return 0.0;
    }
    let diff: Vec<f32> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    (1.0 - mean_var(&diff).1 / var_r) as f32
}
