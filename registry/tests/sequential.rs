//! Statistical soundness of automatic decisions, by simulation (fixed seeds).
//!
//! An experiment is looked at after every batch of outcomes, as a dashboard refreshing all day or
//! the rollout controller ticking would. The mSPRT must keep false decisions at or below alpha
//! however often it is looked at, and still find a real difference within the sample budget.

use algolink_registry::lifecycle::stats::{Comparison, Moments, SequentialConfig, Verdict, msprt, verdict};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Binomial, Distribution};

/// Outcomes per variant added between two looks.
const BATCH: u64 = 50;

/// Runs one experiment: control converting at `p_control`, treatment at `p_treatment`, looked at
/// after every batch until a verdict or the budget. Returns the verdict and the samples per arm.
fn run(cfg: &SequentialConfig, p_control: f64, p_treatment: f64, rng: &mut StdRng) -> (Verdict, u64) {
    let (mut c, mut t) = (Moments::default(), Moments::default());
    let mut look = Comparison::START;
    loop {
        for (m, rate) in [(&mut c, p_control), (&mut t, p_treatment)] {
            let s = Binomial::new(BATCH, rate).unwrap().sample(rng) as f64;
            m.add_many(BATCH, s, s);
        }
        look = msprt(cfg, &c, &t, &look);
        match verdict(cfg, &c, &t, &look, Verdict::Continue) {
            Verdict::Continue => continue,
            v => return (v, c.n),
        }
    }
}

fn config() -> SequentialConfig {
    // The settings configs/lifecycle.toml names for experiments (a budget of 8,000 per variant).
    SequentialConfig { alpha: 0.05, min_effect: 0.02, min_samples: 100, max_samples: 8_000 }
}

#[test]
fn equal_variants_rarely_declared_different_though_watched_continuously() {
    let cfg = config();
    let mut rng = StdRng::seed_from_u64(42);
    let runs = 1000;
    let mut false_decisions = 0;
    for _ in 0..runs {
        if matches!(run(&cfg, 0.10, 0.10, &mut rng).0, Verdict::Better | Verdict::Worse) {
            false_decisions += 1;
        }
    }
    let rate = false_decisions as f64 / runs as f64;
    println!("equal variants: {false_decisions} of {runs} experiments declared a difference ({:.1}%)", rate * 100.0);
    assert!(rate <= cfg.alpha, "false decision rate {rate} exceeds alpha {}", cfg.alpha);
}

#[test]
fn a_drop_from_10_to_8_percent_is_detected_within_the_budget() {
    let cfg = config();
    let mut rng = StdRng::seed_from_u64(7);
    let runs = 1000;
    let mut found = 0;
    let mut wrong_way = 0;
    let mut samples = Vec::new();
    for _ in 0..runs {
        let (v, n) = run(&cfg, 0.10, 0.08, &mut rng);
        match v {
            Verdict::Worse => {
                found += 1;
                samples.push(n);
            }
            Verdict::Better => wrong_way += 1,
            _ => {}
        }
    }
    samples.sort_unstable();
    let power = found as f64 / runs as f64;
    println!(
        "10% -> 8%: detected in {found} of {runs} ({:.1}%) within {} per variant; median {} per variant; {wrong_way} the wrong way",
        power * 100.0,
        cfg.max_samples,
        samples.get(samples.len() / 2).copied().unwrap_or(0),
    );
    assert!(power >= 0.80, "power {power} below 80%");
    assert_eq!(wrong_way, 0);
}
