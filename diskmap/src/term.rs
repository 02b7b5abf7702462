//! A map in a terminal: two rows of cells per line with the upper half
//! block (`▀`, foreground = upper cell, background = lower cell) in 24-bit
//! color, row offsets on the left, a legend below. With an answer since a
//! change ID, the cells it touches keep their color and the others fade.

use std::fmt::Write as _;

use crate::{human, percent, rgb, DiskMap, Layout, OLDER, UNWRITTEN};

/// A color.
type Rgb = (u8, u8, u8);

/// How much a cell outside the answer fades toward white.
const FADE: f64 = 0.7;

fn color_of(map: &DiskMap, hits: &[bool], i: u32) -> Rgb {
    let (r, g, b) = rgb(&map.colors[map.class(i) as usize]);
    if map.since.is_some() && !hits[i as usize] {
        let f = |c: u8| (f64::from(c) + (255.0 - f64::from(c)) * FADE).round() as u8;
        (f(r), f(g), f(b))
    } else {
        (r, g, b)
    }
}

/// The map as lines of text with ANSI 24-bit color escapes, ending in a newline.
pub fn render(map: &DiskMap) -> String {
    let g = &map.geometry;
    let mut hits = vec![false; g.cells as usize];
    if let Some(a) = &map.since {
        for &c in &a.cells {
            if let Some(h) = hits.get_mut(c as usize) {
                *h = true;
            }
        }
    }
    let mut s = String::new();
    let at = match &map.at_change_id {
        Some(c) => format!("{} ({c})", map.at),
        None => map.at.clone(),
    };
    let _ = writeln!(
        s,
        "VM {} disk {} at {at}: {} in {} cells of {}{}",
        map.vm,
        map.disk,
        human(map.capacity),
        g.cells,
        human(g.cell_bytes),
        if g.layout == Layout::Hilbert {
            ", along a Hilbert curve"
        } else {
            ""
        }
    );
    let row_bytes = u64::from(g.columns) * g.cell_bytes;
    for r in (0..g.rows).step_by(2) {
        match g.layout {
            Layout::Grid => {
                let _ = write!(s, "{:>10} ", human(u64::from(r) * row_bytes));
            }
            Layout::Hilbert => s.push_str("  "),
        }
        // Escapes only where the colors change.
        let mut last: Option<(Option<Rgb>, Option<Rgb>)> = None;
        for x in 0..g.columns {
            let up = g.at(x, r).map(|i| color_of(map, &hits, i));
            let down = g.at(x, r + 1).map(|i| color_of(map, &hits, i));
            if last != Some((up, down)) {
                match (up, down) {
                    (Some((a, b, c)), Some((d, e, f))) => {
                        let _ = write!(s, "\x1b[38;2;{a};{b};{c}m\x1b[48;2;{d};{e};{f}m");
                    }
                    (Some((a, b, c)), None) | (None, Some((a, b, c))) => {
                        let _ = write!(s, "\x1b[38;2;{a};{b};{c}m\x1b[49m");
                    }
                    (None, None) => s.push_str("\x1b[0m"),
                }
                last = Some((up, down));
            }
            s.push(match (up, down) {
                (Some(_), _) => '▀',
                (None, Some(_)) => '▄',
                (None, None) => ' ',
            });
        }
        s.push_str("\x1b[0m\n");
    }
    s.push_str(&legend(map, true));
    s
}

/// The legend: each class's color (an ANSI swatch, or `#rrggbb` without
/// `ansi`) and what it stands for, the answer since a change ID, and notes.
pub fn legend(map: &DiskMap, ansi: bool) -> String {
    let mut s = String::new();
    let swatch = |s: &mut String, color: &str, text: String| {
        if ansi {
            let (r, g, b) = rgb(color);
            let _ = writeln!(s, "  \x1b[38;2;{r};{g};{b}m██\x1b[0m {text}");
        } else {
            let _ = writeln!(s, "  {color} {text}");
        }
    };
    swatch(
        &mut s,
        &map.colors[UNWRITTEN as usize],
        format!("never written ({} cells)", map.unwritten_cells),
    );
    swatch(
        &mut s,
        &map.colors[OLDER as usize],
        format!("{}: {}", map.describe(OLDER), human(map.older_bytes)),
    );
    for (i, e) in map.epochs.iter().enumerate() {
        swatch(
            &mut s,
            &e.color,
            format!("{}: {}", map.describe(OLDER + 1 + i as u8), human(e.bytes)),
        );
    }
    if let Some(a) = &map.since {
        let _ = writeln!(
            s,
            "  changed since {}: {} area{}, {} = {} of the disk, in {} cells{}",
            a.change_id,
            a.areas,
            if a.areas == 1 { "" } else { "s" },
            human(a.bytes),
            percent(a.share),
            a.cells.len(),
            if ansi { " (bright; the rest faded)" } else { "" }
        );
    }
    for n in &map.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}
