//! Access distributions over `n` blocks, after fio's `random_distribution`.
//!
//! A [`Distribution`] parses from fio's syntax (`"zipf:0.99".parse()`) and makes a seeded
//! [`Sampler`] over `n` blocks that yields block indices in `0..n`.
//!
//! # Design
//! - `zipf:theta` uses Gray et al.'s generator ("Quickly generating billion-record synthetic
//!   databases", SIGMOD 1994) exactly as fio's `lib/zipf.c`; `pareto:h` is fio's
//!   `v = (n-1) * u^(ln h / ln(1-h))`. Both give a *rank* (0 = hottest), which is then
//!   scattered over the disk so hot blocks do not all sit at the start. fio scatters with
//!   `hash(rank) % n`, which merges some ranks; we use a keyed Feistel permutation of `0..n`
//!   instead (a bijection), so the share of the top k% of blocks is exactly the
//!   distribution's.
//! - fio computes zipf's normalising constant `zeta(n, theta)` over at most 10M terms; we sum
//!   the first 100,000 terms and add the midpoint-rule integral of the tail, which is
//!   accurate to better than 1e-9 relative for any `n`, and fast.
//! - `normal:dev[:center]` is the mean of 12 uniforms (Irwin-Hall, as fio's `lib/gauss.c`),
//!   scaled to a standard deviation of `n*dev/100` blocks around `center*n` (default the
//!   middle) and wrapped into `0..n`. Unlike fio's default it is *not* hashed: a normal
//!   distribution models spatial locality around a centre.
//! - `zoned:a/r:...` (fio's `random_distribution=zoned`): `a`% of accesses fall uniformly in
//!   the next `r`% of the blocks, zones laid out from block 0 in order.
//!
//! # Limitations
//! The samplers use `f64`; with `n` above 2^53 the lowest bits of a rank are not random.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::WorkloadError;
use crate::op::{derive_seed, splitmix64};

/// A zone of `zoned:`: `access_pct`% of the accesses go to the next `range_pct`% of blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Zone {
    /// Share of accesses, in percent.
    pub access_pct: f64,
    /// Share of the block range, in percent.
    pub range_pct: f64,
}

/// An access distribution over `n` blocks (fio's `random_distribution`).
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    /// Every block equally likely (`uniform`, or fio's name `random`).
    Uniform,
    /// Zipf with exponent `theta` (`zipf:theta`, theta > 0, theta != 1).
    Zipf {
        /// The exponent: 0.99 is YCSB's, 1.1 fio's default.
        theta: f64,
    },
    /// Pareto (`pareto:h`, 0 < h < 1): `pareto:0.8` is the 80/20 rule.
    Pareto {
        /// The share parameter.
        h: f64,
    },
    /// Normal (`normal:dev[:center]`): standard deviation `dev`% of the blocks, centred at
    /// `center` (0.0-1.0 of the range, default 0.5).
    Normal {
        /// Standard deviation in percent of the block range.
        dev: f64,
        /// Centre as a fraction of the block range.
        center: f64,
    },
    /// Zones of access and range shares (`zoned:60/10:30/20:10/70`).
    Zoned(Vec<Zone>),
}

impl Distribution {
    /// A sampler over `n` blocks (`n == 0` is taken as 1), reproducible from `seed`.
    ///
    /// `seed` fixes both where the hot blocks lie and the sequence of draws; samplers made
    /// with the same seed and different [`Sampler::set_stream`] share the hot blocks but
    /// draw independently (several threads of one VM).
    pub fn sampler(&self, n: u64, seed: u64) -> Sampler {
        let n = n.max(1);
        let kind = match self {
            Distribution::Uniform => Kind::Uniform,
            Distribution::Zipf { theta } => Kind::Zipf(ZipfParams::new(n, *theta)),
            Distribution::Pareto { h } => Kind::Pareto {
                power: h.ln() / (1.0 - h).ln(),
            },
            Distribution::Normal { dev, center } => Kind::Normal {
                mean: center * n as f64,
                stddev: n as f64 * dev / 100.0,
            },
            Distribution::Zoned(zones) => {
                let mut access = 0.0;
                let mut range = 0.0;
                let mut out = Vec::with_capacity(zones.len());
                for z in zones {
                    let start = (n as f64 * range / 100.0).round() as u64;
                    access += z.access_pct;
                    range += z.range_pct;
                    let end = ((n as f64 * range / 100.0).round() as u64).min(n);
                    out.push(ZoneBounds {
                        cum_access: access / 100.0,
                        start,
                        len: end.saturating_sub(start),
                    });
                }
                Kind::Zoned(out)
            }
        };
        Sampler {
            n,
            kind,
            perm: Permutation::new(n, derive_seed(seed, 0x5ca7)),
            rng: ChaCha8Rng::seed_from_u64(derive_seed(seed, 0xd157)),
        }
    }
}

fn bad(spec: &str, reason: impl Into<String>) -> WorkloadError {
    WorkloadError::BadDistribution {
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

fn parse_f64(spec: &str, what: &str, s: &str) -> Result<f64, WorkloadError> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| bad(spec, format!("{what} {s:?} is not a number")))?;
    if !v.is_finite() {
        return Err(bad(spec, format!("{what} {s:?} is not finite")));
    }
    Ok(v)
}

impl FromStr for Distribution {
    type Err = WorkloadError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut parts = spec.trim().split(':');
        let name = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let arity = |min: usize, max: usize| {
            if args.len() < min || args.len() > max {
                Err(bad(
                    spec,
                    format!(
                        "{name} takes {min} to {max} ':'-separated parameters, got {}",
                        args.len()
                    ),
                ))
            } else {
                Ok(())
            }
        };
        match name {
            "uniform" | "random" => {
                arity(0, 0)?;
                Ok(Distribution::Uniform)
            }
            "zipf" => {
                arity(1, 1)?;
                let theta = parse_f64(spec, "theta", args[0])?;
                if theta <= 0.0 || theta == 1.0 {
                    return Err(bad(spec, format!("zipf theta must be > 0 and != 1, got {theta}")));
                }
                Ok(Distribution::Zipf { theta })
            }
            "pareto" => {
                arity(1, 1)?;
                let h = parse_f64(spec, "h", args[0])?;
                if h <= 0.0 || h >= 1.0 {
                    return Err(bad(spec, format!("pareto h must be in (0, 1), got {h}")));
                }
                Ok(Distribution::Pareto { h })
            }
            "normal" => {
                arity(1, 2)?;
                let dev = parse_f64(spec, "dev", args[0])?;
                if !(0.0..=100.0).contains(&dev) {
                    return Err(bad(spec, format!("normal dev must be in [0, 100] percent, got {dev}")));
                }
                let center = match args.get(1) {
                    Some(c) => parse_f64(spec, "center", c)?,
                    None => 0.5,
                };
                if !(0.0..=1.0).contains(&center) {
                    return Err(bad(spec, format!("normal center must be in [0, 1], got {center}")));
                }
                Ok(Distribution::Normal { dev, center })
            }
            "zoned" => {
                if args.is_empty() {
                    return Err(bad(spec, "zoned needs at least one access%/range% zone"));
                }
                let mut zones = Vec::with_capacity(args.len());
                for z in &args {
                    let (a, r) = z
                        .split_once('/')
                        .ok_or_else(|| bad(spec, format!("zone {z:?} is not access%/range%")))?;
                    let access_pct = parse_f64(spec, "access%", a)?;
                    let range_pct = parse_f64(spec, "range%", r)?;
                    if access_pct < 0.0 || range_pct <= 0.0 {
                        return Err(bad(spec, format!("zone {z:?}: shares must be positive")));
                    }
                    zones.push(Zone { access_pct, range_pct });
                }
                let access: f64 = zones.iter().map(|z| z.access_pct).sum();
                let range: f64 = zones.iter().map(|z| z.range_pct).sum();
                if (access - 100.0).abs() > 1e-6 || (range - 100.0).abs() > 1e-6 {
                    return Err(bad(
                        spec,
                        format!("zone shares must add up to 100%, got access {access}%, range {range}%"),
                    ));
                }
                Ok(Distribution::Zoned(zones))
            }
            other => Err(bad(
                spec,
                format!("unknown distribution {other:?} (expected uniform, zipf, pareto, normal or zoned)"),
            )),
        }
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Distribution::Uniform => write!(f, "uniform"),
            Distribution::Zipf { theta } => write!(f, "zipf:{theta}"),
            Distribution::Pareto { h } => write!(f, "pareto:{h}"),
            Distribution::Normal { dev, center } => write!(f, "normal:{dev}:{center}"),
            Distribution::Zoned(zones) => {
                write!(f, "zoned")?;
                for z in zones {
                    write!(f, ":{}/{}", z.access_pct, z.range_pct)?;
                }
                Ok(())
            }
        }
    }
}

/// Gray et al.'s constants for one `(n, theta)`.
#[derive(Clone, Debug)]
struct ZipfParams {
    alpha: f64,
    eta: f64,
    zetan: f64,
    half_pow_theta: f64,
}

/// Terms of `zeta(n, theta)` summed exactly; the rest is integrated.
const ZETA_EXACT_TERMS: u64 = 100_000;

impl ZipfParams {
    fn new(n: u64, theta: f64) -> Self {
        let exact = n.min(ZETA_EXACT_TERMS);
        let mut zetan: f64 = (1..=exact).map(|i| (i as f64).powf(-theta)).sum();
        if n > exact {
            // Midpoint rule: sum_{i=m+1}^{n} i^-t ~ integral from m+1/2 to n+1/2 of x^-t dx.
            let e = 1.0 - theta;
            zetan += ((n as f64 + 0.5).powf(e) - (exact as f64 + 0.5).powf(e)) / e;
        }
        let zeta2 = 1.0 + 0.5f64.powf(theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        ZipfParams {
            alpha: 1.0 / (1.0 - theta),
            eta,
            zetan,
            half_pow_theta: 0.5f64.powf(theta),
        }
    }

    /// A rank in `0..n` (0 = hottest) from a uniform `u` in [0, 1) (fio `zipf_next`).
    fn rank(&self, n: u64, u: f64) -> u64 {
        let z = u * self.zetan;
        let val = if z < 1.0 {
            1
        } else if z < 1.0 + self.half_pow_theta {
            2
        } else if n <= 2 {
            n
        } else {
            1 + (n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
        };
        (val - 1).min(n - 1)
    }
}

#[derive(Clone, Debug)]
struct ZoneBounds {
    cum_access: f64,
    start: u64,
    len: u64,
}

#[derive(Clone, Debug)]
enum Kind {
    Uniform,
    Zipf(ZipfParams),
    Pareto { power: f64 },
    Normal { mean: f64, stddev: f64 },
    Zoned(Vec<ZoneBounds>),
}

/// A keyed pseudo-random permutation of `0..n`: a 4-round Feistel network over the
/// smallest even number of bits covering `n`, cycle-walking values `>= n` (fewer than 4
/// steps expected, as the domain is below `4n`).
#[derive(Clone, Debug)]
struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Self {
        let bits = (64 - (n.max(2) - 1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let keys = [0, 1, 2, 3].map(|i| derive_seed(seed, i));
        Permutation { n, half_bits, keys }
    }

    fn step(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = splitmix64(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    fn apply(&self, x: u64) -> u64 {
        let mut y = self.step(x);
        while y >= self.n {
            y = self.step(y);
        }
        y
    }
}

/// A seeded source of block indices in `0..n` following a [`Distribution`].
///
/// Made by [`Distribution::sampler`]; the same `(distribution, n, seed)` always yields the
/// same sequence.
#[derive(Clone, Debug)]
pub struct Sampler {
    n: u64,
    kind: Kind,
    perm: Permutation,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// The number of blocks sampled over.
    pub fn n(&self) -> u64 {
        self.n
    }

    /// Switches to an independent stream of draws (ChaCha stream `stream`), keeping the
    /// placement of hot blocks.
    pub fn set_stream(&mut self, stream: u64) {
        self.rng.set_stream(stream);
        self.rng.set_word_pos(0);
    }

    /// The next block index, in `0..n`.
    pub fn next_index(&mut self) -> u64 {
        let n = self.n;
        match &self.kind {
            Kind::Uniform => self.rng.gen_range(0..n),
            Kind::Zipf(p) => {
                let u: f64 = self.rng.gen();
                self.perm.apply(p.rank(n, u))
            }
            Kind::Pareto { power } => {
                let u: f64 = self.rng.gen();
                let v = ((n - 1) as f64 * u.powf(*power)) as u64;
                // fio's v is largest for the most likely values: rank n-1-v is 0 for the hottest.
                self.perm.apply(n - 1 - v.min(n - 1))
            }
            Kind::Normal { mean, stddev } => {
                let sum: f64 = (0..12).map(|_| self.rng.gen::<f64>() - 0.5).sum();
                let x = (mean + stddev * sum).floor();
                (x.rem_euclid(n as f64) as u64).min(n - 1)
            }
            Kind::Zoned(zones) => {
                let u: f64 = self.rng.gen();
                let zone = zones
                    .iter()
                    .find(|z| u < z.cum_access && z.len > 0)
                    .or_else(|| zones.iter().rev().find(|z| z.len > 0));
                match zone {
                    Some(z) => z.start + self.rng.gen_range(0..z.len),
                    None => 0,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Share of all samples that went to the `frac` most-hit blocks.
    fn top_share(counts: &mut [u32], frac: f64) -> f64 {
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        let k = (counts.len() as f64 * frac) as usize;
        counts[..k].iter().map(|&c| c as u64).sum::<u64>() as f64 / total as f64
    }

    fn histogram(d: &str, n: u64, samples: usize) -> Vec<u32> {
        let mut s = d.parse::<Distribution>().unwrap().sampler(n, 1);
        let mut counts = vec![0u32; n as usize];
        for _ in 0..samples {
            let i = s.next_index();
            counts[i as usize] += 1;
        }
        counts
    }

    #[test]
    fn zipf_099_matches_reference_shares() {
        // REFERENCE.md section 7: top 1%/10% of blocks get 66%/83% at theta 0.99
        // (exact zipf over 1M blocks gives 66.4%/83.0%).
        let mut c = histogram("zipf:0.99", 1_000_000, 4_000_000);
        let top10 = top_share(&mut c.clone(), 0.10);
        let top1 = top_share(&mut c, 0.01);
        eprintln!("zipf:0.99 top 1% {top1:.3} top 10% {top10:.3}");
        assert!((top1 - 0.66).abs() < 0.03, "top 1% got {top1}");
        assert!((top10 - 0.83).abs() < 0.03, "top 10% got {top10}");
    }

    #[test]
    fn zipf_other_thetas() {
        for (theta, r1, r10) in [(0.8, 0.36, 0.61), (1.2, 0.91, 0.97)] {
            let mut c = histogram(&format!("zipf:{theta}"), 1_000_000, 4_000_000);
            let top10 = top_share(&mut c.clone(), 0.10);
            let top1 = top_share(&mut c, 0.01);
            eprintln!("zipf:{theta} top 1% {top1:.3} top 10% {top10:.3}");
            assert!((top1 - r1).abs() < 0.04, "theta {theta}: top 1% got {top1}");
            assert!((top10 - r10).abs() < 0.04, "theta {theta}: top 10% got {top10}");
        }
    }

    #[test]
    fn zipf_hot_blocks_are_scattered() {
        let mut c = histogram("zipf:0.99", 100_000, 500_000);
        let mut idx: Vec<usize> = (0..c.len()).collect();
        idx.sort_unstable_by_key(|&i| std::cmp::Reverse(c[i]));
        // The 100 hottest blocks are spread over the disk, not packed at its start.
        let hot_in_first_tenth = idx[..100].iter().filter(|&&i| i < 10_000).count();
        assert!(hot_in_first_tenth < 30, "{hot_in_first_tenth}");
        c.clear();
    }

    #[test]
    fn pareto_08_is_80_20() {
        let mut c = histogram("pareto:0.8", 100_000, 2_000_000);
        let top20 = top_share(&mut c, 0.20);
        eprintln!("pareto:0.8 top 20% {top20:.3}");
        assert!((top20 - 0.80).abs() < 0.03, "top 20% got {top20}");
    }

    #[test]
    fn normal_has_requested_spread() {
        let n = 100_000u64;
        let mut s = "normal:10:0.3".parse::<Distribution>().unwrap().sampler(n, 9);
        let samples = 200_000;
        let within = (0..samples)
            .filter(|_| s.next_index().abs_diff(30_000) <= 10_000)
            .count();
        let share = within as f64 / samples as f64;
        assert!((share - 0.683).abs() < 0.01, "within 1 sigma: {share}");
    }

    #[test]
    fn zoned_shares() {
        let c = histogram("zoned:60/10:30/20:10/70", 10_000, 1_000_000);
        let sum = |r: std::ops::Range<usize>| c[r].iter().map(|&x| x as f64).sum::<f64>() / 1e6;
        assert!((sum(0..1000) - 0.6).abs() < 0.005);
        assert!((sum(1000..3000) - 0.3).abs() < 0.005);
        assert!((sum(3000..10_000) - 0.1).abs() < 0.005);
    }

    #[test]
    fn uniform_covers_range() {
        let c = histogram("uniform", 100, 100_000);
        assert!(c.iter().all(|&x| (800..1200).contains(&x)));
    }

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "uniform",
            "zipf:0.99",
            "pareto:0.8",
            "normal:5:0.25",
            "zoned:60/10:30/20:10/70",
        ] {
            let d: Distribution = s.parse().unwrap();
            assert_eq!(d.to_string().parse::<Distribution>().unwrap(), d);
        }
        assert_eq!("random".parse::<Distribution>().unwrap(), Distribution::Uniform);
        assert_eq!(
            "normal:5".parse::<Distribution>().unwrap(),
            Distribution::Normal { dev: 5.0, center: 0.5 }
        );
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let err = |s: &str| s.parse::<Distribution>().unwrap_err().to_string();
        assert!(err("zipf:1").contains("!= 1"));
        assert!(err("zipf:abc").contains("theta \"abc\" is not a number"));
        assert!(err("zipf").contains("zipf takes 1 to 1"));
        assert!(err("pareto:1.5").contains("(0, 1)"));
        assert!(err("zoned:60/10:30/20").contains("add up to 100%"));
        assert!(err("zoned:60-10:40/90").contains("not access%/range%"));
        assert!(err("gauss:3").contains("unknown distribution \"gauss\""));
        assert!(err("normal:5:2").contains("center"));
    }

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 7, 100, 1000, 4097] {
            let p = Permutation::new(n, 42);
            let mut seen = vec![false; n as usize];
            for x in 0..n {
                let y = p.apply(x);
                assert!(y < n && !seen[y as usize]);
                seen[y as usize] = true;
            }
        }
    }

    #[test]
    fn tiny_and_degenerate_ranges_stay_in_bounds() {
        for d in [
            "uniform",
            "zipf:0.99",
            "zipf:1.2",
            "pareto:0.9",
            "normal:50",
            "zoned:50/50:50/50",
        ] {
            let dist: Distribution = d.parse().unwrap();
            for n in [0u64, 1, 2, 3] {
                let mut s = dist.sampler(n, 3);
                for _ in 0..1000 {
                    assert!(s.next_index() < n.max(1), "{d} n={n}");
                }
            }
        }
    }

    #[test]
    fn samplers_are_reproducible() {
        let d: Distribution = "zipf:0.9".parse().unwrap();
        let a: Vec<u64> = {
            let mut s = d.sampler(1 << 20, 5);
            (0..100).map(|_| s.next_index()).collect()
        };
        let mut s = d.sampler(1 << 20, 5);
        let b: Vec<u64> = (0..100).map(|_| s.next_index()).collect();
        assert_eq!(a, b);
        let mut s = d.sampler(1 << 20, 6);
        let c: Vec<u64> = (0..100).map(|_| s.next_index()).collect();
        assert_ne!(a, c);
        let mut s = d.sampler(1 << 20, 5);
        s.set_stream(1);
        let e: Vec<u64> = (0..100).map(|_| s.next_index()).collect();
        assert_ne!(a, e);
    }
}
