//! Figures: a measurement beside the baseline measured in the same run, the ratio, and the
//! target it is held to; printed as a table and written as JSON.

use std::{fmt::Write as _, path::Path};

use serde_json::{Value, json};

/// What a target bounds: the ratio to the baseline, or the measurement itself.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    RatioAtMost(f64),
    RatioAtLeast(f64),
    ValueAtMost(f64),
    ValueAtLeast(f64),
}

impl Target {
    fn describe(self, unit: &str) -> String {
        match self {
            Self::RatioAtMost(bound) => format!("ratio <= {bound}"),
            Self::RatioAtLeast(bound) => format!("ratio >= {bound}"),
            Self::ValueAtMost(bound) => format!("<= {bound} {unit}"),
            Self::ValueAtLeast(bound) => format!(">= {bound} {unit}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub scenario: &'static str,
    pub measure: String,
    pub ours: f64,
    /// `None` for figures that stand alone (a count, a fraction).
    pub baseline: Option<f64>,
    pub unit: &'static str,
    pub target: Option<Target>,
}

impl Figure {
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .filter(|baseline| *baseline != 0.0)
            .map(|baseline| self.ours / baseline)
    }

    /// `None` without a target, or when the ratio it needs could not be formed.
    pub fn met(&self) -> Option<bool> {
        Some(match self.target? {
            Target::RatioAtMost(bound) => self.ratio()? <= bound,
            Target::RatioAtLeast(bound) => self.ratio()? >= bound,
            Target::ValueAtMost(bound) => self.ours <= bound,
            Target::ValueAtLeast(bound) => self.ours >= bound,
        })
    }

    fn json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "measure": self.measure,
            "ours": self.ours,
            "baseline": self.baseline,
            "unit": self.unit,
            "ratio": self.ratio(),
            "target": self.target.map(|target| target.describe(self.unit)),
            "met": self.met(),
        })
    }
}

/// Everything one run measured.
pub struct Report {
    pub figures: Vec<Figure>,
    /// Per scenario, what it ran on and the raw numbers behind its figures.
    pub details: serde_json::Map<String, Value>,
}

impl Report {
    pub fn new() -> Self {
        Self {
            figures: Vec::new(),
            details: serde_json::Map::new(),
        }
    }

    pub fn add(&mut self, figure: Figure) {
        println!("{}", row(&figure));
        self.figures.push(figure);
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<5} {:<46} {:>12} {:>12} {:>8} {:<8} {:<16} {}\n",
            "scen", "measure", "ours", "baseline", "ratio", "unit", "target", "met"
        );
        for figure in &self.figures {
            let _ = writeln!(out, "{}", row(figure));
        }
        out
    }

    pub fn write(&self, path: &Path, environment: Value) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = json!({
            "environment": environment,
            "figures": self.figures.iter().map(Figure::json).collect::<Vec<_>>(),
            "details": self.details,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
    }
}

fn row(figure: &Figure) -> String {
    let number = |value: f64| {
        if value.abs() >= 100.0 || value.fract() == 0.0 {
            format!("{value:.0}")
        } else {
            format!("{value:.3}")
        }
    };
    format!(
        "{:<5} {:<46} {:>12} {:>12} {:>8} {:<8} {:<16} {}",
        figure.scenario,
        figure.measure,
        number(figure.ours),
        figure.baseline.map(number).unwrap_or_else(|| "-".into()),
        figure
            .ratio()
            .map(|ratio| format!("{ratio:.3}"))
            .unwrap_or_else(|| "-".into()),
        figure.unit,
        figure
            .target
            .map(|target| target.describe(figure.unit))
            .unwrap_or_default(),
        match figure.met() {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "",
        }
    )
}

/// The `q` quantile (0..=1) of `sorted` (nearest rank); 0 for no samples.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub const QUANTILES: [(&str, f64); 4] =
    [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

/// Percentiles of latencies in nanoseconds, as microseconds, for the details.
pub fn percentiles_us(sorted: &[u64]) -> Value {
    let mut map = serde_json::Map::new();
    for (name, q) in QUANTILES {
        map.insert(name.into(), json!(quantile(sorted, q) as f64 / 1000.0));
    }
    map.insert("samples".into(), json!(sorted.len()));
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&samples, 0.5), 500);
        assert_eq!(quantile(&samples, 0.99), 990);
        assert_eq!(quantile(&samples, 0.999), 999);
        assert_eq!(quantile(&samples, 1.0), 1000);
        assert_eq!(quantile(&[7], 0.999), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn targets_judge_the_ratio_or_the_value() {
        let figure = |ours, baseline, target| Figure {
            scenario: "t",
            measure: "m".into(),
            ours,
            baseline,
            unit: "us",
            target: Some(target),
        };
        assert_eq!(
            figure(3.0, Some(2.0), Target::RatioAtMost(2.0)).met(),
            Some(true)
        );
        assert_eq!(
            figure(5.0, Some(2.0), Target::RatioAtMost(2.0)).met(),
            Some(false)
        );
        assert_eq!(
            figure(1.0, Some(4.0), Target::RatioAtLeast(0.5)).met(),
            Some(false)
        );
        assert_eq!(
            figure(1.0, Some(0.0), Target::RatioAtLeast(0.5)).met(),
            None
        );
        assert_eq!(
            figure(31.0, None, Target::ValueAtMost(32.0)).met(),
            Some(true)
        );
        assert_eq!(
            figure(0.5, None, Target::ValueAtLeast(1.0)).met(),
            Some(false)
        );
    }
}
