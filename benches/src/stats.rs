//! Medians, quartiles and latency histograms.

use hdrhistogram::Histogram;

/// The median of `v` (the mean of the two middle values for an even count); NaN if empty.
pub fn median(v: &mut [f64]) -> f64 {
    quantile(v, 0.5)
}

/// The `q` quantile of `v` (0..=1) by linear interpolation; NaN if empty.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Per-round ratios `a[i] / b[i]`: what an A/B comparison reports, so drift
/// between rounds cancels.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// Whether per-round figures meet "at least `target`": "yes" when even the
/// lower quartile `q1` meets it, "no" when even the upper quartile `q3` misses
/// it, else "unclear" (the rounds disagree: the machine was too noisy to tell).
pub fn verdict_at_least(q1: f64, median: f64, q3: f64, target: f64) -> &'static str {
    if q1 >= target {
        "yes"
    } else if q3 < target {
        "no"
    } else if median >= target {
        "unclear (median meets it)"
    } else {
        "unclear (median misses it)"
    }
}

/// Whether per-round figures meet "at most `target`": "yes" when even the
/// upper quartile `q3` meets it, "no" when even the lower quartile `q1`
/// misses it, else "unclear".
pub fn verdict_at_most(q1: f64, median: f64, q3: f64, target: f64) -> &'static str {
    verdict_at_least(-q3, -median, -q1, -target)
}

/// A latency histogram in nanoseconds, 1 ns to 100 s, 3 significant figures.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
        let mut v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.25), 25.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(ratios(&[2.0, 9.0], &[1.0, 3.0]), vec![2.0, 3.0]);
    }

    #[test]
    fn verdicts_use_the_pessimistic_quartile() {
        assert_eq!(verdict_at_least(0.98, 0.99, 1.0, 0.97), "yes");
        assert_eq!(verdict_at_least(0.90, 0.95, 0.96, 0.97), "no");
        assert_eq!(verdict_at_least(0.96, 0.975, 0.98, 0.97), "unclear (median meets it)");
        assert_eq!(verdict_at_least(0.96, 0.965, 0.98, 0.97), "unclear (median misses it)");
        assert_eq!(verdict_at_most(1.0, 1.1, 1.2, 1.25), "yes");
        assert_eq!(verdict_at_most(1.3, 1.4, 1.5, 1.25), "no");
        assert_eq!(verdict_at_most(1.2, 1.3, 1.4, 1.25), "unclear (median misses it)");
    }

    #[test]
    fn histogram_holds_nanoseconds_to_seconds() {
        let mut h = latency_histogram();
        h.record(1).unwrap();
        h.record(10_000_000_000).unwrap();
        assert_eq!(h.len(), 2);
    }
}
