//! exp and erf in plain f32 arithmetic the compiler vectorises, and `vectorized!`, which builds
//! a kernel twice (for AVX2 + FMA and for the baseline) and picks one at run time. The libm
//! `exp`/`erf` are scalar calls: over attention's 577×577 scores they cost more than the
//! matmuls around them.

/// `fn name(args) { body }` compiled for AVX2 + FMA where the CPU has them.
macro_rules! vectorized {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized;

/// eˣ in f32 (Cephes' `expf`: range reduction by ln 2, a degree-5 polynomial; within 2 ulp)
/// on [−87.3, 88]; exactly 0 below (no subnormals, and 0 for −∞, as masked scores are), +∞
/// above 88.7.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_359_375 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_15e-4_f32;
    p = p * r + 1.398_199_950_7e-3;
    p = p * r + 8.333_451_907_3e-3;
    p = p * r + 4.166_579_589_4e-2;
    p = p * r + 1.666_666_545_9e-1;
    p = p * r + 5.000_000_120_1e-1;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23) as u32);
    let v = y * scale;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

/// erf in f32 (the rational approximation of Eigen and XLA: |error| < 5e-7 over the line);
/// beyond ±4 it is ±1 in f32.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.72614225801306e-10_f32;
    for c in [
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    ] {
        p = p * x2 + c;
    }
    let mut q = -1.45660718464996e-05_f32;
    for c in [-2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02] {
        q = q * x2 + c;
    }
    x * p / q
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_and_erf_match_libm() {
        let (mut worst_exp, mut worst_erf) = (0f64, 0f64);
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.35e-4; // −87 … 87
            let e = (x as f64).exp();
            worst_exp = worst_exp.max(((super::exp(x) as f64) - e).abs() / e);
            let y = i as f32 * 3e-5; // −6 … 6
            worst_erf = worst_erf.max((super::erf(y) as f64 - libm_erf(y as f64)).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 6e-7, "erf absolute error {worst_erf}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-1e4), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(f32::NAN).is_nan());
        assert_eq!(super::exp(100.0), f32::INFINITY);
    }

    /// erf by its Taylor series (|x| < 3) or its asymptotic continued fraction, in f64.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() >= 3.0 {
            // erfc(x) ≈ e^{-x²}/(x√π)·(1 − 1/(2x²) + 3/(4x⁴)): below 1e-5 here, erf = 1 − erfc.
            let a = x.abs();
            let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * a * a) + 3.0 / (4.0 * a.powi(4)));
            return x.signum() * (1.0 - erfc);
        }
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
