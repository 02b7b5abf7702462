//! A map as an SVG picture: the cells (one path per epoch), the cells that
//! the answer since a change ID touches (dots, and an outline around them),
//! row offsets, and a legend naming the snapshots and change IDs.
//!
//! Elements a page or a test can find: `path.epoch` (one per class drawn,
//! `data-class`), `path.hits` (`data-cells`: how many cells the answer
//! touches), `path.answer` (the outline), `g.legend`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::{human, percent, DiskMap, Layout, OLDER, UNWRITTEN};

/// Font size of the text, in pixels.
const FONT: f64 = 13.0;
/// Advance of one character of the monospace font (0.602 em).
const ADVANCE: f64 = 7.83;
/// Line height.
const LINE: f64 = 18.0;
/// Margin around everything.
const MARGIN: f64 = 16.0;
/// Width the map aims at.
const MAP_WIDTH: u32 = 640;

/// Where things go.
struct Frame {
    pitch: u32,
    size: u32,
    x0: f64,
    y0: f64,
}

fn frame(map: &DiskMap) -> Frame {
    let g = &map.geometry;
    let pitch = (MAP_WIDTH / g.columns.max(g.rows)).clamp(3, 32);
    let size = if pitch >= 6 { pitch - 1 } else { pitch };
    let label = match g.layout {
        Layout::Grid => 10.0 * ADVANCE + 8.0,
        Layout::Hilbert => 0.0,
    };
    Frame {
        pitch,
        size,
        x0: MARGIN + label,
        y0: MARGIN + 2.0 * LINE + 10.0,
    }
}

/// A row's offset: `0`, `32 MiB`.
fn offset(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        human(n)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of the legend: a swatch (or none) and text.
struct Entry {
    swatch: Swatch,
    text: String,
    detail: Option<String>,
}

enum Swatch {
    Fill(String),
    Outline,
    None,
}

fn legend(map: &DiskMap) -> Vec<Entry> {
    let cells = |n: u32| {
        if n == 1 {
            "1 cell".to_owned()
        } else {
            format!("{n} cells")
        }
    };
    let mut out = vec![Entry {
        swatch: Swatch::Fill(map.colors[UNWRITTEN as usize].clone()),
        text: format!("never written: {}", cells(map.unwritten_cells)),
        detail: None,
    }];
    out.push(Entry {
        swatch: Swatch::Fill(map.colors[OLDER as usize].clone()),
        text: format!("{}: {}", map.describe(OLDER), human(map.older_bytes)),
        detail: Some(match map.epochs.first() {
            Some(e) => format!(
                "allocated, older than change ID {}; {}",
                e.change_id,
                cells(map.older_cells)
            ),
            None => format!("the answer of * (allocated); {}", cells(map.older_cells)),
        }),
    });
    for (i, e) in map.epochs.iter().enumerate() {
        out.push(Entry {
            swatch: Swatch::Fill(e.color.clone()),
            text: format!("{}: {}", map.describe(OLDER + 1 + i as u8), human(e.bytes)),
            detail: Some(format!("change ID {}; {}", e.change_id, cells(e.cells))),
        });
    }
    if let Some(s) = &map.since {
        out.push(Entry {
            swatch: Swatch::Outline,
            text: format!(
                "changed since {}: {} = {} of the disk",
                crate::short_id(&s.change_id),
                human(s.bytes),
                percent(s.share)
            ),
            detail: Some(format!(
                "QueryChangedDiskAreas since {}: {} area{} in {} (dots)",
                s.change_id,
                s.areas,
                if s.areas == 1 { "" } else { "s" },
                cells(s.cells.len() as u32)
            )),
        });
    }
    for n in &map.notes {
        out.push(Entry {
            swatch: Swatch::None,
            text: format!("note: {n}"),
            detail: None,
        });
    }
    out
}

/// The title's two lines.
fn title(map: &DiskMap) -> [String; 2] {
    let g = &map.geometry;
    let at = match &map.at_change_id {
        Some(c) => format!("{} (change ID {c})", map.at),
        None => map.at.clone(),
    };
    let order = match g.layout {
        Layout::Grid => format!("{} columns, offset 0 at the top left", g.columns),
        Layout::Hilbert => "a Hilbert curve from the top left to the top right".to_owned(),
    };
    [
        format!("VM {} disk {} at {at}", map.vm, map.disk),
        format!(
            "{} disk: {} cells of {} ({} blocks); {order}; a cell shows its newest epoch",
            human(map.capacity),
            g.cells,
            human(g.cell_bytes),
            human(map.granularity)
        ),
    ]
}

/// The picture, as a standalone SVG document, its legend to the right of the cells.
pub fn render(map: &DiskMap) -> String {
    draw(map, false)
}

/// The picture with its legend below the cells (narrower, for a page).
pub fn render_narrow(map: &DiskMap) -> String {
    draw(map, true)
}

fn draw(map: &DiskMap, below: bool) -> String {
    let g = &map.geometry;
    let f = frame(map);
    let p = f64::from(f.pitch);
    let (mw, mh) = (f64::from(g.columns) * p, f64::from(g.rows) * p);
    let entries = legend(map);
    let (lx, ly) = if below {
        (MARGIN, f.y0 + mh + 16.0)
    } else {
        (f.x0 + mw + 24.0, f.y0)
    };
    let longest = entries
        .iter()
        .flat_map(|e| [e.text.len() + 3, e.detail.as_ref().map_or(0, |d| d.len() + 3)])
        .max()
        .unwrap_or(0);
    let legend_h: f64 = entries
        .iter()
        .map(|e| if e.detail.is_some() { 2.0 } else { 1.0 })
        .sum::<f64>()
        * LINE;
    let titles = title(map);
    let title_w = titles.iter().map(|t| t.len()).max().unwrap_or(0) as f64 * ADVANCE;
    let width = (lx + longest as f64 * ADVANCE).max(MARGIN + title_w).max(f.x0 + mw) + MARGIN;
    let height = (ly + legend_h).max(f.y0 + mh) + MARGIN;

    let mut s = String::with_capacity(64 * 1024);
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"diskmap\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"DejaVu Sans Mono, Menlo, Consolas, monospace\" \
         font-size=\"{FONT}\" data-cells=\"{}\" data-cell-bytes=\"{}\">",
        g.cells, g.cell_bytes
    );
    let _ = write!(
        s,
        "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\
         <text x=\"{MARGIN}\" y=\"{:.0}\" font-weight=\"bold\">{}</text>\
         <text x=\"{MARGIN}\" y=\"{:.0}\" fill=\"#555555\">{}</text>",
        MARGIN + FONT,
        escape(&titles[0]),
        MARGIN + FONT + LINE,
        escape(&titles[1])
    );

    // Never-written cells: a pattern of white squares on grid lines, under the disk's extent.
    let white = &map.colors[UNWRITTEN as usize];
    let _ = write!(
        s,
        "<defs><pattern id=\"cells\" x=\"{:.0}\" y=\"{:.0}\" width=\"{p}\" height=\"{p}\" patternUnits=\"userSpaceOnUse\">\
         <rect width=\"{p}\" height=\"{p}\" fill=\"#dddddd\"/><rect width=\"{}\" height=\"{}\" fill=\"{white}\"/></pattern></defs>",
        f.x0, f.y0, f.size, f.size
    );
    let full_rows = match g.layout {
        Layout::Grid => g.cells / g.columns,
        Layout::Hilbert => g.rows,
    };
    let _ = write!(
        s,
        "<rect x=\"{:.0}\" y=\"{:.0}\" width=\"{mw:.0}\" height=\"{:.0}\" fill=\"url(#cells)\"/>",
        f.x0,
        f.y0,
        f64::from(full_rows) * p
    );
    if g.layout == Layout::Grid && !g.cells.is_multiple_of(g.columns) {
        let _ = write!(
            s,
            "<rect x=\"{:.0}\" y=\"{:.0}\" width=\"{:.0}\" height=\"{p}\" fill=\"url(#cells)\"/>",
            f.x0,
            f.y0 + f64::from(full_rows) * p,
            f64::from(g.cells % g.columns) * p
        );
    }
    if g.layout == Layout::Hilbert {
        // Positions of the square past the disk's end.
        let mut d = String::new();
        for i in g.cells..g.columns * g.rows {
            let (x, y) = crate::geometry::hilbert_xy(g.columns, i);
            let _ = write!(
                d,
                "M{:.0} {:.0}h{p}v{p}h-{p}z",
                f.x0 + f64::from(x) * p,
                f.y0 + f64::from(y) * p
            );
        }
        if !d.is_empty() {
            let _ = write!(s, "<path class=\"beyond\" fill=\"#f4f4f4\" d=\"{d}\"/>");
        }
    }

    // Row offsets of a grid, every few rows.
    if g.layout == Layout::Grid {
        let every = (LINE / p).ceil().max(1.0) as u32;
        let row_bytes = u64::from(g.columns) * g.cell_bytes;
        s.push_str("<g class=\"offsets\" fill=\"#555555\" text-anchor=\"end\">");
        for r in (0..g.rows).step_by(every as usize) {
            let _ = write!(
                s,
                "<text x=\"{:.0}\" y=\"{:.1}\">{}</text>",
                f.x0 - 6.0,
                f.y0 + f64::from(r) * p + p / 2.0 + FONT * 0.35,
                escape(&offset(u64::from(r) * row_bytes))
            );
        }
        s.push_str("</g>");
    }

    // One path per class of written cells.
    let sz = f.size;
    let mut paths: Vec<String> = vec![String::new(); map.colors.len()];
    for (i, &c) in map.cells.iter().enumerate() {
        if c == UNWRITTEN {
            continue;
        }
        let (x, y) = g.xy(i as u32);
        let _ = write!(
            paths[c as usize],
            "M{:.0} {:.0}h{sz}v{sz}h-{sz}z",
            f.x0 + f64::from(x) * p,
            f.y0 + f64::from(y) * p
        );
    }
    for (c, d) in paths.iter().enumerate() {
        if !d.is_empty() {
            let _ = write!(
                s,
                "<path class=\"epoch\" data-class=\"{c}\" fill=\"{}\" d=\"{d}\"/>",
                map.colors[c]
            );
        }
    }

    // The answer: a dot in each cell it touches, and an outline around them.
    if let Some(a) = &map.since {
        let dot = (f64::from(sz) / 3.0).round().max(2.0);
        let off = (f64::from(sz) - dot) / 2.0;
        let mut dots = String::new();
        let set: BTreeSet<(u32, u32)> = a.cells.iter().map(|&i| g.xy(i)).collect();
        let mut edges = String::new();
        for &(x, y) in &set {
            let (px, py) = (f.x0 + f64::from(x) * p, f.y0 + f64::from(y) * p);
            let _ = write!(dots, "M{:.1} {:.1}h{dot}v{dot}h-{dot}z", px + off, py + off);
            let hit = |dx: i64, dy: i64| {
                let (nx, ny) = (i64::from(x) + dx, i64::from(y) + dy);
                nx >= 0 && ny >= 0 && set.contains(&(nx as u32, ny as u32))
            };
            if !hit(0, -1) {
                let _ = write!(edges, "M{px:.0} {py:.0}h{p}");
            }
            if !hit(0, 1) {
                let _ = write!(edges, "M{px:.0} {:.0}h{p}", py + p);
            }
            if !hit(-1, 0) {
                let _ = write!(edges, "M{px:.0} {py:.0}v{p}");
            }
            if !hit(1, 0) {
                let _ = write!(edges, "M{:.0} {py:.0}v{p}", px + p);
            }
        }
        let _ = write!(
            s,
            "<path class=\"hits\" data-cells=\"{}\" data-bytes=\"{}\" fill=\"#111111\" fill-opacity=\"0.8\" d=\"{dots}\"/>\
             <path class=\"answer\" fill=\"none\" stroke=\"#000000\" stroke-width=\"2\" stroke-linecap=\"square\" d=\"{edges}\"/>",
            a.cells.len(),
            a.bytes
        );
    }

    // The legend.
    s.push_str("<g class=\"legend\">");
    let mut y = ly;
    for e in &entries {
        match &e.swatch {
            Swatch::Fill(color) => {
                let _ = write!(
                    s,
                    "<rect x=\"{lx:.0}\" y=\"{:.0}\" width=\"14\" height=\"14\" fill=\"{color}\" stroke=\"#999999\"/>",
                    y + 1.0
                );
            }
            Swatch::Outline => {
                let _ = write!(
                    s,
                    "<rect x=\"{lx:.0}\" y=\"{:.0}\" width=\"14\" height=\"14\" fill=\"#ffffff\" stroke=\"#000000\" stroke-width=\"2\"/>\
                     <rect x=\"{:.0}\" y=\"{:.0}\" width=\"4\" height=\"4\" fill=\"#111111\"/>",
                    y + 1.0,
                    lx + 5.0,
                    y + 6.0
                );
            }
            Swatch::None => {}
        }
        let _ = write!(
            s,
            "<text x=\"{:.0}\" y=\"{:.0}\">{}</text>",
            lx + 22.0,
            y + FONT,
            escape(&e.text)
        );
        y += LINE;
        if let Some(d) = &e.detail {
            let _ = write!(
                s,
                "<text x=\"{:.0}\" y=\"{:.0}\" fill=\"#666666\" font-size=\"11\">{}</text>",
                lx + 22.0,
                y + FONT - 2.0,
                escape(d)
            );
            y += LINE;
        }
    }
    s.push_str("</g></svg>\n");
    s
}
