//! Results as a human table, or with `--json` one JSON object per line.
//!
//! Every JSON line carries `"bench"` (the binary) and `"section"` before the
//! row's own fields, in the order the row set them. Tables are printed per
//! section, when the next section starts or the report finishes; JSON lines
//! are printed (and flushed) as soon as a row is pushed.

use std::io::Write;

use serde_json::Value;

/// One result: named fields in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    fields: Vec<(&'static str, Value)>,
}

impl Row {
    /// An empty row.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a text field.
    pub fn text(mut self, key: &'static str, v: impl Into<String>) -> Self {
        self.fields.push((key, Value::String(v.into())));
        self
    }

    /// Adds an integer field.
    pub fn int(mut self, key: &'static str, v: u64) -> Self {
        self.fields.push((key, Value::from(v)));
        self
    }

    /// Adds a number, rounded to 4 significant digits (`null` if not finite).
    pub fn num(mut self, key: &'static str, v: f64) -> Self {
        let v = if v.is_finite() {
            Value::from(round_sig(v, 4))
        } else {
            Value::Null
        };
        self.fields.push((key, v));
        self
    }

    /// Adds a yes/no field.
    pub fn flag(mut self, key: &'static str, v: bool) -> Self {
        self.fields.push((key, Value::Bool(v)));
        self
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// One JSON object, `bench` and `section` first.
    pub fn to_json(&self, bench: &str, section: &str) -> String {
        let mut out = String::from("{");
        out.push_str(&format!(
            "\"bench\":{},\"section\":{}",
            Value::from(bench),
            Value::from(section)
        ));
        for (k, v) in &self.fields {
            out.push_str(&format!(",{}:{}", Value::from(*k), v));
        }
        out.push('}');
        out
    }
}

/// Rounds `v` to `digits` significant digits.
fn round_sig(v: f64, digits: i32) -> f64 {
    if v == 0.0 {
        return 0.0;
    }
    let scale = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_u64() {
            Some(i) => i.to_string(),
            None => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.abs() >= 1000.0 {
                    format!("{f:.0}")
                } else if f.abs() >= 10.0 {
                    format!("{f:.1}")
                } else {
                    format!("{f:.4}")
                }
            }
        },
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Collects rows per section and prints them.
#[derive(Debug)]
pub struct Report {
    bench: &'static str,
    json: bool,
    section: String,
    legend: String,
    rows: Vec<Row>,
    all: Vec<(String, Row)>,
}

impl Report {
    /// A report for binary `bench`; `json` prints JSON lines instead of tables.
    pub fn new(bench: &'static str, json: bool) -> Self {
        Self {
            bench,
            json,
            section: String::new(),
            legend: String::new(),
            rows: Vec::new(),
            all: Vec::new(),
        }
    }

    /// Starts a new section (prints the previous one's table). A name of the
    /// form `"short (legend)"` is `"short"` in JSON; tables show the legend too.
    pub fn section(&mut self, name: &str) {
        self.flush_table();
        let (short, legend) = match name.split_once(" (") {
            Some((s, l)) => (s, format!(" ({l}")),
            None => (name, String::new()),
        };
        self.section = short.to_owned();
        self.legend = legend;
    }

    /// Adds a result row.
    pub fn push(&mut self, row: Row) {
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", row.to_json(self.bench, &self.section));
            let _ = out.flush();
        }
        self.all.push((self.section.clone(), row.clone()));
        self.rows.push(row);
    }

    /// A line of explanation: on stdout with tables, on stderr with JSON (so
    /// stdout stays JSON lines only).
    pub fn note(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    /// Every row pushed so far, with its section.
    pub fn rows(&self) -> &[(String, Row)] {
        &self.all
    }

    /// Prints the last table.
    pub fn finish(mut self) {
        self.flush_table();
    }

    fn flush_table(&mut self) {
        let rows = std::mem::take(&mut self.rows);
        if self.json || rows.is_empty() {
            return;
        }
        let mut cols: Vec<&'static str> = Vec::new();
        for r in &rows {
            for (k, _) in &r.fields {
                if !cols.contains(k) {
                    cols.push(k);
                }
            }
        }
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| cols.iter().map(|c| r.get(c).map_or_else(String::new, cell)).collect())
            .collect();
        let widths: Vec<usize> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| cells.iter().map(|r| r[i].len()).max().unwrap_or(0).max(c.len()))
            .collect();
        let line = |items: Vec<String>| {
            items
                .iter()
                .zip(&widths)
                .map(|(s, w)| format!("{s:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("\n== {} / {}{}", self.bench, self.section, self.legend);
        println!("{}", line(cols.iter().map(|c| c.to_string()).collect()));
        for r in cells {
            println!("{}", line(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_field_order_and_round() {
        let r = Row::new()
            .text("case", "4k-random")
            .int("threads", 2)
            .num("ratio", 0.987_654_3)
            .num("bad", f64::NAN)
            .flag("met", true);
        let line = r.to_json("overhead", "write path");
        assert_eq!(
            line,
            r#"{"bench":"overhead","section":"write path","case":"4k-random","threads":2,"ratio":0.9877,"bad":null,"met":true}"#
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["threads"], 2);
    }

    #[test]
    fn section_legends_stay_out_of_json() {
        let mut r = Report::new("b", true);
        r.section("write path (ratio = on / off)");
        assert_eq!(r.section, "write path");
        assert_eq!(r.legend, " (ratio = on / off)");
        r.section("goals");
        assert_eq!((r.section.as_str(), r.legend.as_str()), ("goals", ""));
    }

    #[test]
    fn significant_digits() {
        assert_eq!(round_sig(123_456.0, 4), 123_500.0);
        assert_eq!(round_sig(0.000_123_456, 4), 0.000_123_5);
        assert_eq!(round_sig(-2.5, 4), -2.5);
        assert_eq!(cell(&Value::from(0.97)), "0.9700");
        assert_eq!(cell(&Value::from(1234.4)), "1234");
    }
}
