//! Thompson sampling over variants: each variant's share of traffic is the posterior probability
//! that it is the best, estimated by drawing from each posterior, with a floor so none starves.

use rand::Rng;
use rand_distr::{Beta, Distribution, Normal};

use super::stats::Moments;

/// How outcomes are modelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 0/1 conversions: Beta(1 + successes, 1 + failures).
    Conversion,
    /// Numeric rewards: normal posterior of the mean.
    Reward,
}

/// Shares (percent, summing to 100) for the variants whose outcomes are `arms`. `floor` is the
/// least percent of each; `draws` Monte Carlo draws estimate P(best).
pub fn thompson_shares(outcome: Outcome, arms: &[Moments], floor: f64, draws: usize, rng: &mut impl Rng) -> Vec<f64> {
    let k = arms.len();
    if k == 0 {
        return Vec::new();
    }
    let floor = floor.clamp(0.0, 100.0 / k as f64);
    // A spread for rewards when an arm has too few outcomes to measure its own: the pooled one.
    let pooled = {
        let all = arms.iter().fold(Moments::default(), |mut acc, m| {
            acc.add_many(m.n, m.sum, m.sum_sq);
            acc
        });
        let v = all.variance();
        if v > 0.0 { v.sqrt() } else { 1.0 }
    };
    let mut wins = vec![0usize; k];
    let mut sample = vec![0.0; k];
    for _ in 0..draws.max(1) {
        for (i, m) in arms.iter().enumerate() {
            sample[i] = match outcome {
                Outcome::Conversion => {
                    let s = m.sum.clamp(0.0, m.n as f64);
                    Beta::new(1.0 + s, 1.0 + m.n as f64 - s).map(|b| b.sample(rng)).unwrap_or(0.5)
                }
                Outcome::Reward => {
                    let sd = if m.n >= 2 && m.variance() > 0.0 { m.variance().sqrt() } else { pooled };
                    let se = sd / (m.n.max(1) as f64).sqrt() * if m.n == 0 { 1e3 } else { 1.0 };
                    Normal::new(m.mean(), se).map(|d| d.sample(rng)).unwrap_or(m.mean())
                }
            };
        }
        let best = (0..k).max_by(|&a, &b| sample[a].total_cmp(&sample[b])).unwrap_or(0);
        wins[best] += 1;
    }
    let free = 100.0 - floor * k as f64;
    let total = wins.iter().sum::<usize>() as f64;
    wins.iter().map(|&w| floor + free * w as f64 / total).collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::Binomial;

    use super::*;

    fn conv(n: u64, s: u64) -> Moments {
        Moments { n, sum: s as f64, sum_sq: s as f64 }
    }

    #[test]
    fn shares_table() {
        let mut rng = StdRng::seed_from_u64(7);
        // (arms, floor, expected shares, tolerance)
        let cases: Vec<(Vec<Moments>, f64, Vec<f64>, f64)> = vec![
            (vec![conv(0, 0), conv(0, 0)], 5.0, vec![50.0, 50.0], 4.0),
            (vec![conv(10_000, 1000), conv(10_000, 1500)], 5.0, vec![5.0, 95.0], 0.1),
            (vec![conv(10_000, 1500), conv(10_000, 1000), conv(10_000, 1000)], 10.0, vec![80.0, 10.0, 10.0], 0.1),
            (vec![conv(10_000, 1000), conv(10_000, 1500)], 50.0, vec![50.0, 50.0], 1e-9),
            (vec![conv(10_000, 1000), conv(10_000, 1500)], 0.0, vec![0.0, 100.0], 0.1),
        ];
        for (arms, floor, want, tol) in cases {
            let got = thompson_shares(Outcome::Conversion, &arms, floor, 4000, &mut rng);
            assert!((got.iter().sum::<f64>() - 100.0).abs() < 1e-9);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= tol, "{arms:?} floor {floor}: got {got:?}, want {want:?}");
            }
        }
        let rewards = [
            Moments { n: 1000, sum: 1000.0 * 5.0, sum_sq: 1000.0 * 26.0 },
            Moments { n: 1000, sum: 1000.0 * 6.0, sum_sq: 1000.0 * 37.0 },
        ];
        let got = thompson_shares(Outcome::Reward, &rewards, 5.0, 4000, &mut rng);
        assert!(got[1] > 94.0, "{got:?}");
        assert!(thompson_shares(Outcome::Reward, &[], 5.0, 10, &mut rng).is_empty());
    }

    /// Routing by Thompson shares, recomputed after every round of traffic, on arms converting at
    /// 10% and 13%: once the difference is clear the better arm gets at least 90% of traffic.
    #[test]
    fn thompson_routing_favours_the_better_arm() {
        let mut rng = StdRng::seed_from_u64(2026);
        let rates = [0.10, 0.13];
        let mut arms = [Moments::default(); 2];
        let mut late = [0u64; 2];
        let rounds = 200;
        let per_round = 500;
        for round in 0..rounds {
            let shares = thompson_shares(Outcome::Conversion, &arms, 5.0, 2000, &mut rng);
            let to_second = Binomial::new(per_round, shares[1] / 100.0).unwrap().sample(&mut rng);
            for (i, n) in [per_round - to_second, to_second].into_iter().enumerate() {
                let s = Binomial::new(n, rates[i]).unwrap().sample(&mut rng);
                arms[i].add_many(n, s as f64, s as f64);
                if round >= rounds / 2 {
                    late[i] += n;
                }
            }
        }
        let share = late[1] as f64 / (late[0] + late[1]) as f64;
        assert!(share >= 0.90, "better arm got {:.1}% of the second half's traffic", share * 100.0);
        println!("thompson: better arm share in the second half {:.1}%", share * 100.0);
    }
}
